"""SD3's hooks. Heavy imports live in tuner_sd3.model, imported inside the hooks."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.types import ConfigKey, FamilyInfo

FAMILY = FamilyInfo(
    name="sd3",
    description="Stable Diffusion 3 / 3.5 (MMDiT; CLIP-L + CLIP-G + T5)",
    flavours={
        "3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
        "3.5-large": "stabilityai/stable-diffusion-3.5-large",
        "3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    },
    default_flavour="3.5-medium",
    required_text_keys=("prompt_embeds", "pooled_prompt_embeds"),
    transformer_class="diffusers.SD3Transformer2DModel",
    pipeline_class="diffusers.StableDiffusion3Pipeline",
    lora_alpha_in="metadata",  # diffusers' SD3 loader ignores .alpha tensors
)

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONTEXT = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FFS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
PRESETS = {"attention": ATTENTION, "all": ATTENTION + CONTEXT, "all+ffs": ATTENTION + CONTEXT + FFS}
SD3_SHIFT = 3.0

KEYS = (
    ConfigKey(
        "sd3_lora_target",
        "str_or_list",
        "all",
        "LoRA targets: a preset or module names.",
        choices=tuple(PRESETS),
        ask=True,  # `tuner configure` asks for it
    ),
    ConfigKey("tokenizer_max_length", "int", 256, "T5 tokens per caption.", minimum=1),
    ConfigKey("validation_guidance", "float", 5.0, "CFG scale at validation (1.0: a single pass).", minimum=0),
)


@hookimpl
def register_families(register):
    register(FAMILY)


@hookimpl
def register_config_keys(register):
    for key in KEYS:
        register(key)


@hookimpl
def check_config(config):
    if not config.flow_schedule_auto_shift:
        config.set_default("flow_schedule_shift", SD3_SHIFT)  # SD3 trains with a shift of 3


@hookimpl
def register_commands(app):
    @app.command("sd3-make-tiny")
    def make_tiny(folder: str, seed: int = 0) -> None:
        """Write a random miniature SD3 pipeline (diffusers layout) to FOLDER, for offline runs."""
        from tuner_sd3.tiny import build_tiny_sd3

        print(f"wrote {build_tiny_sd3(folder, seed=seed)}")


@hookimpl
def cache_fingerprint(config, kind):
    return {"tokenizer_max_length": config.tokenizer_max_length, "text": "sd3-v1"} if kind == "text" else None


@hookimpl
def load_model(config, component, dtype):
    from tuner_sd3 import model

    return model.load(config, component, dtype)


@hookimpl
def encode_prompts(text_encoders, prompts, config):
    from tuner_sd3 import model

    return model.encode_prompts(text_encoders, prompts, config)


@hookimpl
def example_text(config, transformer, batch_size, dtype):
    import torch

    # SD3's pipeline pads CLIP prompts to CLIP's 77 positions and appends the T5 tokens
    tokens, model = 77 + config.tokenizer_max_length, transformer.config
    return {
        "prompt_embeds": torch.zeros(batch_size, tokens, model.joint_attention_dim, dtype=dtype),
        "pooled_prompt_embeds": torch.zeros(batch_size, model.pooled_projection_dim, dtype=dtype),
    }


@hookimpl
def lora_target_modules(config, transformer):
    from tuner_sd3 import model

    return model.lora_targets(config, transformer)


@hookimpl
def high_precision_modules(transformer):
    keep = ("pos_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out")
    return [name for name, _ in transformer.named_modules() if name in keep]


@hookimpl
def predict_flow(transformer, noisy_latents, sigmas, text):
    from tuner_sd3 import model

    return model.predict_flow(transformer, noisy_latents, sigmas, text)


@hookimpl
def generate_images(request):
    from tuner_sd3 import model

    return model.generate_images(request)
