"""Flux.1's manifest: the family, its config keys, formats and config checks. Import-cheap; the
hooks that load, encode, predict and render live in ``tuner.plugins.flux.model``.

Flux.1: CLIP-L (pooled) + T5-XXL, a guidance embedding in dev, logit-normal sigmas with static or
resolution-dependent shift (or schnell's fast schedule), optional attention masking."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.api import ConfigKey, FamilyInfo, manifest_hooks
from tuner.plugins.fluxlike import keys as shared
from tuner.plugins.fluxlike.formats import COMFYUI

PRESETS = {
    **shared.PRESETS,
    "tiny": ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"],
    "nano": ["single_transformer_blocks.7.proj_out"],
}
T5_TOKENS = {"dev": 512, "schnell": 256}
HIGH_PRECISION = ("x_embedder", "context_embedder", "proj_out", "norm_out")

FAMILY = FamilyInfo(
    name="flux",
    description="Flux.1 dev / schnell (CLIP-L + T5-XXL)",
    flavours={"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell"},
    default_flavour="dev",
    transformer_class="diffusers.FluxTransformer2DModel",
    vae_class="diffusers.AutoencoderKL",
    scheduler_class="diffusers.FlowMatchEulerDiscreteScheduler",
    pipeline_class="diffusers.FluxPipeline",
    lora_target_key="flux_lora_target",
    lora_presets=PRESETS,
    high_precision=HIGH_PRECISION,
    text_cache_keys=("tokenizer_max_length",),
    text_encoding="flux-clip-t5-v1",
    required_text_keys=("prompt_embeds", "pooled_prompt_embeds", "attention_mask"),
    implementation="tuner.plugins.flux.model",
    text_encoders=("clip", "t5"),  # SimpleTuner's text_encoder_1 (CLIP-L) and text_encoder_2 (T5-XXL)
)

KEYS = (
    shared.lora_target_key(PRESETS),
    shared.T5_PADDING,
    *shared.GUIDANCE_KEYS,
    shared.FAST_SCHEDULE,
    ConfigKey(
        "tokenizer_max_length",
        "int",
        None,
        "T5 tokens per caption (default: 512 dev, 256 schnell).",
        minimum=1,
        recipe=True,
    ),
    ConfigKey(
        "flux_attention_masked_training",
        "bool",
        False,
        "Mask T5 padding in the transformer's attention (off in Flux's own training).",
        recipe=True,
    ),
    ConfigKey(
        "validation_guidance",
        "float",
        3.5,
        "Distilled guidance at validation (dev).",
        minimum=0,
        recipe=True,
        group="validation",
    ),
    ConfigKey(
        "validation_guidance_real",
        "float",
        1.0,
        "Real CFG scale at validation; > 1 runs a second pass with the negative prompt.",
        minimum=0,
        recipe=True,
        group="validation",
    ),
)


register_families, register_config_keys, register_lora_formats = manifest_hooks(FAMILY, KEYS, [COMFYUI])


@hookimpl
def check_config(config, warn):
    config.set_default("tokenizer_max_length", T5_TOKENS.get(config.model_flavour, 512))
    if config.tokenizer_max_length > 512:
        raise config.error(
            "tokenizer_max_length", f"T5 in Flux takes at most 512 tokens, got {config.tokenizer_max_length}"
        )
    shared.check_guidance_range(config)
    if config.flux_fast_schedule and (config.flow_schedule_shift is not None or config.flow_schedule_auto_shift):
        warn(f"{config.source}: flow_schedule_shift/flow_schedule_auto_shift are ignored with flux_fast_schedule")
    if config.flux_fast_schedule and config.is_set("sigma_sampling"):
        warn(f"{config.source}: sigma_sampling is ignored with flux_fast_schedule (schnell's four levels)")
    if config.flux_fast_schedule and config.model_flavour != "schnell":
        warn(
            f"{config.source}: flux_fast_schedule is meant for schnell; this run trains flavour {config.model_flavour}"
        )
    if config.flux_attention_masked_training and config.validation_guidance_real > 1:
        raise config.error(
            "validation_guidance_real",
            "real CFG at validation cannot mask the negative prompt's padding (FluxPipeline passes one mask to "
            "both passes); set it to 1.0 or turn off flux_attention_masked_training",
        )
