"""Chroma's manifest: the family, its config keys and formats. Import-cheap; the hooks that load,
encode, predict and render live in ``tuner.plugins.chroma.model``, registered with the family
when a run selects it.

What makes Chroma different from Flux: T5 only (no CLIP, no pooled vector), attention masking
always on, no guidance embedding, a quadratic tail remap of sigmas, and real CFG at validation."""

from __future__ import annotations

from tuner.core.api import ConfigKey, FamilyInfo, manifest_hooks
from tuner.plugins.fluxlike import keys as shared
from tuner.plugins.fluxlike.formats import COMFYUI

NO_GUIDANCE = "Chroma has no guidance embedding (Chroma exposes no guidance range)"
OWN_SIGMAS = "Chroma remaps sigmas itself (see chroma_sigma_remap)"

PRESETS = {**shared.PRESETS, "tiny": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]}
APPROXIMATOR = "distilled_guidance_layer"
# kept in high precision when the base is quantized
HIGH_PRECISION = ("x_embedder", "context_embedder", "proj_out", "norm_out", APPROXIMATOR)

FAMILY = FamilyInfo(
    name="chroma",
    description="Chroma 1 (8.9B, de-distilled Flux.1 Schnell derivative), T5 text encoder",
    flavours={
        "base": "lodestones/Chroma1-Base",
        "hd": "lodestones/Chroma1-HD",
        "flash": "lodestones/Chroma1-Flash",
    },
    default_flavour="base",
    transformer_class="diffusers.ChromaTransformer2DModel",
    vae_class="diffusers.AutoencoderKL",
    scheduler_class="diffusers.FlowMatchEulerDiscreteScheduler",
    guidance_key="validation_guidance_real",
    pipeline_class="diffusers.ChromaPipeline",
    lora_target_key="flux_lora_target",
    lora_presets=PRESETS,
    never_adapt={APPROXIMATOR: "the approximator: LoRAs on it break Chroma"},
    # full fine-tuning leaves it too, as Chroma's own trainer does (full_frozen_modules: [] trains it)
    frozen_in_full={APPROXIMATOR: "the approximator (the modulation from the timestep), frozen as Chroma trains"},
    high_precision=HIGH_PRECISION,
    text_cache_keys=("tokenizer_max_length",),
    text_encoding="chroma-t5-v1",
    required_text_keys=("prompt_embeds", "attention_mask"),
    implementation="tuner.plugins.chroma.model",
    text_encoders=("encoder",),
    supports=("img2img",),  # validation_init_image: ChromaImg2ImgPipeline
    ignored_keys={
        "flux_guidance_mode": NO_GUIDANCE,
        "flux_guidance_value": NO_GUIDANCE,
        "flux_guidance_min": NO_GUIDANCE,
        "flux_guidance_max": NO_GUIDANCE,
        "flow_schedule_shift": OWN_SIGMAS,
        "flow_schedule_auto_shift": OWN_SIGMAS,
    },
    refused_keys={
        "flux_fast_schedule": "must stay off for Chroma, which remaps sigmas itself (see chroma_sigma_remap)",
    },
)

KEYS = (
    shared.lora_target_key(PRESETS),
    shared.T5_PADDING,
    *shared.GUIDANCE_KEYS,  # accepted from SimpleTuner configs, ignored (see FAMILY.ignored_keys)
    shared.FAST_SCHEDULE,
    ConfigKey("tokenizer_max_length", "int", 512, "T5 tokens per caption.", minimum=1, recipe=True, maximum=4096),
    ConfigKey(
        "validation_guidance_real",
        "float",
        4.0,
        "CFG scale at validation (1.0: a single pass, no negative prompt).",
        aliases=("validation_guidance",),
        minimum=0,
        ask=True,
        recipe=True,
        group="validation",
    ),
    ConfigKey(
        "chroma_sigma_remap",
        "str",
        "random",
        "How sigmas are remapped to heavier tails: 'random' picks sigma^2 or 1-(1-sigma)^2 per sample "
        "(covers all of (0,1)); 'threshold' is SimpleTuner's rule (shift 3, branch at 0.5; "
        "never trains sigma in [0.25, 0.75)).",
        choices=("random", "threshold"),
        group="optimisation",
    ),
)


register_families, register_config_keys, register_lora_formats = manifest_hooks(FAMILY, KEYS, [COMFYUI])
