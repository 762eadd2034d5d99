"""The core's own plugin: it registers the core's config keys, the family-neutral defaults
(``trylast``, so any installed plugin overrides them; some answer from the family's record), the
adapter types, the diffusers LoRA format and AdamW.

It uses the same ``@hookimpl`` as third-party plugins, is loaded by the host by name (like an entry
point) and keeps heavy imports inside the hooks.
"""

from __future__ import annotations

from dataclasses import replace

from tuner.core import hookimpl
from tuner.core.builtin.adapter_types import ADAPTER_TYPES
from tuner.core.config.keys import ASKED, CORE_KEYS
from tuner.core.config.keys.optimization import adam_settings
from tuner.core.config.relations import check_relations
from tuner.core.host.records import LoraFormat, OptimizerInfo


@hookimpl
def register_config_keys(register):
    for key in CORE_KEYS:
        register(replace(key, ask=key.name in ASKED))


@hookimpl
def check_config(config, warn):
    check_relations(config, warn)


@hookimpl(trylast=True)
def load_model(config, component, dtype, family):
    from tuner.core.model.pretrained import load_declared

    return load_declared(family, config, component, dtype)


@hookimpl(trylast=True)
def lora_target_modules(config, transformer, family):
    from tuner.core.model.lora import declared_targets

    return declared_targets(config, transformer, family)


@hookimpl(trylast=True)
def high_precision_modules(transformer, family):
    return [name for name, _ in transformer.named_modules() if name in family.high_precision]


@hookimpl
def cache_fingerprint(config, kind, family):
    if kind != "text" or family is None or not (family.text_cache_keys or family.text_encoding):
        return None
    return {**{key: config[key] for key in family.text_cache_keys}, "text_encoding": family.text_encoding}


@hookimpl(trylast=True)
def encode_images(vae, pixels):
    latents = vae.encode(pixels).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


@hookimpl(trylast=True)
def example_vae_latents(vae, height, width, dtype):
    import torch

    downscale = 2 ** (len(vae.config.block_out_channels) - 1)
    return torch.zeros(1, vae.config.latent_channels, height // downscale, width // downscale, dtype=dtype)


@hookimpl(trylast=True)
def sample_sigmas(config, batch_size, latent_shape, generator):
    from tuner.core.model import flow

    return flow.sample_shifted_logit_normal(config, batch_size, latent_shape, generator)


@hookimpl(trylast=True)
def inference_sigmas(config, scheduler, num_steps, latent_shape):
    import copy

    import numpy as np

    if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "sigmas"):
        return None
    scheduler = copy.deepcopy(scheduler)  # set_timesteps changes it; validation keeps its own
    options = {}
    if getattr(scheduler.config, "use_dynamic_shifting", False):  # the resolution shift its pipelines apply
        from tuner.core.model import flow

        options["mu"] = flow.dynamic_shift_mu(flow.packed_tokens(latent_shape), scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), **options)
    return scheduler.sigmas.float().cpu()


def _export_diffusers(export, transformer):
    from tuner.core.model.lora import diffusers_layout

    return {"pytorch_lora_weights.safetensors": diffusers_layout(export)}


def _read_diffusers(path, transformer, family):
    from tuner.core.model.selftest import read_with_diffusers

    return read_with_diffusers(path, transformer, family)  # LoKr/LoHa: with ComfyUI's arithmetic


DIFFUSERS_FORMAT = LoraFormat(
    "diffusers",
    "pytorch_lora_weights.safetensors: diffusers names with a scalar .alpha per module "
    "(diffusers' load_lora_weights; ComfyUI reads it too)",
    export=_export_diffusers,
    read=_read_diffusers,
    detect=lambda keys: any(k.startswith("transformer.") for k in keys),
)


@hookimpl
def register_adapter_types(register):
    for info in ADAPTER_TYPES:
        register(info)


@hookimpl
def register_lora_formats(register):
    register(DIFFUSERS_FORMAT)


def _build_adamw(config, params, options):
    import torch

    # one kernel for every parameter on CUDA (the same state, so checkpoints do not change)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, **{**adam_settings(config), "fused": fused, **options})


@hookimpl
def register_optimizers(register):
    register(OptimizerInfo("adamw", "torch's AdamW (fused on CUDA); adam_* keys", _build_adamw))
