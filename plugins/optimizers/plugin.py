"""Registers the optimizers SimpleTuner users reach for besides AdamW: ``adamw8bit``
(bitsandbytes), ``adafactor`` (transformers) and ``prodigy`` (the optional ``prodigyopt``
package). Import-cheap: each library is imported when its optimizer is built."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.api import OptimizerInfo, adam_settings


def build_adamw8bit(config, params, options):
    import bitsandbytes

    # bitsandbytes keeps tensors under 4096 elements in 32 bits (min_8bit_size): small adapters
    # gain little; the states of larger ones take a quarter of AdamW's
    return bitsandbytes.optim.AdamW8bit(params, **{**adam_settings(config), **options})


def build_adafactor(config, params, options):
    from transformers.optimization import Adafactor

    # a fixed learning rate from the run's schedule (not Adafactor's own relative step), as
    # SimpleTuner and kohya use it for LoRA
    settings = {"lr": config.learning_rate, "relative_step": False, "scale_parameter": False, "warmup_init": False}
    return Adafactor(params, **{**settings, **options})


def check_prodigy(config, warn):
    if config.learning_rate < 0.1:
        warn(
            f"{config.source}: learning_rate {config.learning_rate:g} with prodigy: Prodigy finds the step size "
            "itself and learning_rate multiplies it; 1.0 is the usual value"
        )


def build_prodigy(config, params, options):
    from prodigyopt import Prodigy

    # bias correction and the warm-up safeguard on, as SimpleTuner's and kohya's guides advise
    settings = {**adam_settings(config), "use_bias_correction": True, "safeguard_warmup": True}
    return Prodigy(params, **{**settings, **options})


@hookimpl
def register_optimizers(register):
    register(
        OptimizerInfo(
            "adamw8bit",
            "bitsandbytes' 8-bit AdamW: a quarter of AdamW's state for tensors of 4096+ elements; CUDA, and "
            "the CPU through bitsandbytes' CPU kernels; adam_* keys",
            build_adamw8bit,
            requires=("bitsandbytes",),
            install_hint="install it with: pip install bitsandbytes  (or: pip install 'tuner[bnb]')",
        )
    )
    register(
        OptimizerInfo(
            "adafactor",
            "transformers' Adafactor with the run's learning rate (factored second moments, no first moment)",
            build_adafactor,
            requires=("transformers",),
        )
    )
    register(
        OptimizerInfo(
            "prodigy",
            "Prodigy (prodigyopt): estimates the step size; learning_rate 1.0; adam_* keys, optimizer_config "
            "for d_coef and the rest",
            build_prodigy,
            requires=("prodigyopt",),
            install_hint="install it with: pip install prodigyopt  (or: pip install 'tuner[prodigy]')",
            check=check_prodigy,
        )
    )
