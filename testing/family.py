"""tuner.testing's own miniature family, ``testing``: a two-layer MMDiT (diffusers'
``SD3Transformer2DModel``) with one T5 encoder, built offline by :func:`build_tiny_model`. The
kits (``optimizer_contract``, a tracker's or a backend's tests) train it, so a third party's tests
run without tuner's bundled families installed. A manifest like any family's: import-cheap, the
hooks that need torch in :mod:`tuner.testing.family_model`.

    from tuner.testing import family, make_host
    host = make_host(("testing", family), family="testing")
"""

from __future__ import annotations

from pathlib import Path

from tuner.core.api import ConfigKey, FamilyInfo, manifest_hooks

NAME = "testing"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
PRESETS = {
    "attention": ATTENTION,
    "all": ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "all+ffs": ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2"),
}

FAMILY = FamilyInfo(
    name=NAME,
    description="tuner.testing's miniature MMDiT with one T5 (for plugin tests; build_tiny_model makes it)",
    flavours={"tiny": "tuner-testing/tiny-mmdit"},  # never on a hub: tests pass the built folder
    default_flavour="tiny",
    transformer_class="diffusers.SD3Transformer2DModel",
    vae_class="diffusers.AutoencoderKL",
    scheduler_class="diffusers.FlowMatchEulerDiscreteScheduler",
    pipeline_class="diffusers.StableDiffusion3Pipeline",  # the reference reader of diffusers LoRAs
    text_encoders=("encoder",),  # on what its load_model returns for the text side (T5 only)
    required_text_keys=("prompt_embeds", "pooled_prompt_embeds"),
    text_cache_keys=("tokenizer_max_length",),
    text_encoding="testing-t5-v1",
    lora_target_key="testing_lora_target",
    lora_presets=PRESETS,
    high_precision=("pos_embed", "context_embedder", "time_text_embed", "norm_out", "proj_out"),
    lora_alpha_in="metadata",  # diffusers' SD3 loader reads alpha from metadata
    implementation="tuner.testing.family_model",
)

KEYS = (
    ConfigKey("testing_lora_target", "str_or_list", "all", "LoRA targets.", choices=tuple(PRESETS), group="LoRA"),
    ConfigKey("tokenizer_max_length", "int", 16, "T5 tokens per caption.", minimum=1, maximum=512, recipe=True),
)

register_families, register_config_keys, register_lora_formats = manifest_hooks(FAMILY, KEYS)


def build_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the family's random miniature (diffusers layout) to ``folder``: loaded through the
    same ``from_pretrained`` code as any model."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from tuner.testing import tiny

    torch.manual_seed(seed)
    tokenizer = tiny.t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=tiny.mmdit(pooled_projection_dim=tiny.TEXT_WIDTH),  # pooled: the mean of the T5 tokens
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny.vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=tiny.t5_encoder(len(tokenizer)),
        tokenizer_3=tokenizer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
