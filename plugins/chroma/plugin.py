"""Chroma's hooks. What makes Chroma different from Flux lives here and in the modules beside it:
T5 only (no CLIP, no pooled vector), attention masking always on, no guidance embedding, a
quadratic tail remap of sigmas, and real CFG at validation."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.types import ConfigKey, FamilyInfo
from tuner.plugins.fluxlike import keys as shared
from tuner.plugins.fluxlike.hooks import export_lora, lora_formats, read_lora  # noqa: F401 (the ComfyUI format)

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
    guidance_key="validation_guidance_real",
    pipeline_class="diffusers.ChromaPipeline",
    required_text_keys=("prompt_embeds", "attention_mask"),
)

PRESETS = {**shared.PRESETS, "tiny": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]}
APPROXIMATOR = "distilled_guidance_layer"
# kept in high precision when the base is quantized
HIGH_PRECISION = ["x_embedder", "context_embedder", "proj_out", "norm_out", APPROXIMATOR]

KEYS = (
    shared.lora_target_key(PRESETS),
    shared.T5_PADDING,
    *shared.GUIDANCE_KEYS,
    shared.FAST_SCHEDULE,
    ConfigKey("tokenizer_max_length", "int", 512, "T5 tokens per caption.", minimum=1),
    ConfigKey(
        "validation_guidance_real",
        "float",
        4.0,
        "CFG scale at validation (1.0: a single pass, no negative prompt).",
        aliases=("validation_guidance",),
        minimum=0,
        ask=True,
    ),
    ConfigKey(
        "chroma_sigma_remap",
        "str",
        "random",
        "How sigmas are remapped to heavier tails: 'random' picks sigma^2 or 1-(1-sigma)^2 per sample "
        "(covers all of (0,1)); 'threshold' is SimpleTuner's rule (shift 3, branch at 0.5; "
        "never trains sigma in [0.25, 0.75)).",
        choices=("random", "threshold"),
    ),
)

IGNORED_BY_CHROMA = ("flux_guidance_mode", "flux_guidance_value", "flux_guidance_min", "flux_guidance_max")


@hookimpl
def register_families(register):
    register(FAMILY)


@hookimpl
def register_config_keys(register):
    for key in KEYS:
        register(key)


@hookimpl
def check_config(config, warn):
    if config.flux_fast_schedule:
        raise config.error(
            "flux_fast_schedule", "must stay off for Chroma, which remaps sigmas itself (see chroma_sigma_remap)"
        )
    if config.validation_init_image:
        raise config.error("validation_init_image", "Chroma is text-to-image only in tuner; img2img is not supported")
    for name in ("flow_schedule_shift", "flow_schedule_auto_shift"):
        if config.is_set(name):
            warn(f"{config.source}: {name} is ignored for Chroma, which remaps sigmas itself (chroma_sigma_remap)")
    ignored = [name for name in IGNORED_BY_CHROMA if config.is_set(name)]
    if ignored:
        warn(f"{config.source}: {', '.join(ignored)} ignored: Chroma has no guidance embedding")


@hookimpl
def cache_fingerprint(config, kind):
    if kind == "text":
        return {"tokenizer_max_length": config.tokenizer_max_length, "text_encoding": "chroma-t5-v1"}
    return None


@hookimpl
def load_model(config, component, dtype):
    from tuner.plugins.chroma import model

    return model.load(config, component, dtype)


@hookimpl
def encode_prompts(text_encoders, prompts, config):
    from tuner.plugins.chroma import model

    return model.encode_prompts(text_encoders, prompts, config)


@hookimpl
def example_text(config, transformer, batch_size, dtype):
    from tuner.plugins.fluxlike.hooks import t5_example_text

    return t5_example_text(config, transformer, batch_size, dtype, pooled=False)


@hookimpl
def sample_sigmas(config, batch_size, generator):
    from tuner.plugins.chroma import sigmas

    return sigmas.sample(batch_size, generator, config.chroma_sigma_remap, config.flow_sigmoid_scale)


@hookimpl
def lora_target_modules(config, transformer):
    from tuner.plugins.chroma import model

    return model.lora_targets(config, transformer)


@hookimpl
def high_precision_modules(transformer):
    return [
        name for name, _ in transformer.named_modules() if name in HIGH_PRECISION or name.startswith(f"{APPROXIMATOR}.")
    ]


@hookimpl
def predict_flow(transformer, noisy_latents, sigmas, text, config):
    from tuner.plugins.chroma import model

    return model.predict_flow(transformer, noisy_latents, sigmas, text, config)


@hookimpl
def generate_images(request):
    from tuner.plugins.chroma import model

    return model.generate_images(request)


@hookimpl
def recipe_snippet(recipe):
    from tuner.plugins.chroma import snippet

    return snippet.render(recipe)
