"""SD3's manifest: the family as data, and its config keys. Import-cheap: the hooks that need torch
and diffusers live in tuner_sd3.model (FAMILY.implementation), which tuner imports and registers
with the family when a run selects it."""

from __future__ import annotations

from tuner.core import hookimpl
from tuner.core.api import ConfigKey, FamilyInfo, manifest_hooks

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONTEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FFS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
PRESETS = {"attention": ATTENTION, "all": ATTENTION + CONTEXT, "all+ffs": ATTENTION + CONTEXT + FFS}

FAMILY = FamilyInfo(
    name="sd3",
    description="Stable Diffusion 3 / 3.5 (MMDiT; CLIP-L + CLIP-G + T5)",
    flavours={
        "3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
        "3.5-large": "stabilityai/stable-diffusion-3.5-large",
        "3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    },
    default_flavour="3.5-medium",
    # what tuner loads for it (the text encoders: the pipeline without transformer and VAE)
    transformer_class="diffusers.SD3Transformer2DModel",
    vae_class="diffusers.AutoencoderKL",
    scheduler_class="diffusers.FlowMatchEulerDiscreteScheduler",
    pipeline_class="diffusers.StableDiffusion3Pipeline",  # also the reference reader of diffusers LoRAs
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),  # CLIP-L, CLIP-G, T5
    required_text_keys=("prompt_embeds", "pooled_prompt_embeds"),  # checked in every text cache entry
    text_cache_keys=("tokenizer_max_length",),  # a new value re-encodes the captions
    text_encoding="sd3-v1",
    lora_target_key="sd3_lora_target",
    lora_presets=PRESETS,
    high_precision=("pos_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out"),
    lora_alpha_in="metadata",  # diffusers' SD3 loader ignores .alpha tensors: alpha goes in metadata
    defaults={"flow_schedule_shift": 3.0},  # SD3 trains with a shift of 3
    implementation="tuner_sd3.model",  # the hooks where SD3 differs: encoding, prediction, validation
)


KEYS = (
    ConfigKey(
        "sd3_lora_target",
        "str_or_list",
        "all",
        "LoRA targets: a preset or module names.",
        choices=tuple(PRESETS),
        ask=True,  # `tuner configure` asks for it
        resume_critical=True,  # resuming with other targets is refused
        group="LoRA",  # where the web UI's form and `tuner keys` show it
    ),
    ConfigKey("tokenizer_max_length", "int", 256, "T5 tokens per caption.", minimum=1, recipe=True),
    ConfigKey(
        "validation_guidance",
        "float",
        5.0,
        "CFG scale at validation (1.0: a single pass).",
        minimum=0,
        recipe=True,  # recipe.json records it; `tuner sample --recipe` renders with it
        group="validation",
    ),
)


register_families, register_config_keys, register_lora_formats = manifest_hooks(FAMILY, KEYS)


@hookimpl
def register_commands(app):
    @app.command("sd3-make-tiny")
    def make_tiny(folder: str, seed: int = 0) -> None:
        """Write a random miniature SD3 pipeline (diffusers layout) to FOLDER, for offline runs."""
        from tuner_sd3.tiny import build_tiny_sd3

        print(f"wrote {build_tiny_sd3(folder, seed=seed)}")
