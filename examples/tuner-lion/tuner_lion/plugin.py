"""tuner's entry point: registers ``lion``. Import-cheap: torch is imported when a run builds it."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.api import OptimizerInfo


def build(config, params, options):
    from tuner_lion.lion import Lion

    settings = {"lr": config.learning_rate, "betas": (0.9, 0.99), "weight_decay": config.adam_weight_decay}
    return Lion(params, **{**settings, **options})


@hookimpl
def register_optimizers(register):
    register(
        OptimizerInfo(
            "lion",
            "Lion (sign of an interpolated momentum; one state tensor per parameter); betas in optimizer_config",
            build,
            requires=("torch",),
        )
    )
