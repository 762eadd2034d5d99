"""A miniature SD3 with random weights (two CLIPs, T5, MMDiT, VAE) in diffusers layout, built offline
with tuner's public testing kit."""

from __future__ import annotations

from pathlib import Path

CLIP_WIDTH = 32  # each CLIP; their concatenation (64) must fit the T5 width
T5_WIDTH = 64


def build_tiny_sd3(folder: str | Path, seed: int = 0) -> Path:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from tuner.testing import tiny

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = tiny.clip_tokenizer(), tiny.t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=tiny.mmdit(joint_attention_dim=T5_WIDTH, pooled_projection_dim=2 * CLIP_WIDTH),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny.vae(),
        text_encoder=tiny.clip_encoder(len(clip_tokenizer), with_projection=True, width=CLIP_WIDTH),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny.clip_encoder(len(clip_tokenizer), with_projection=True, width=CLIP_WIDTH),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=tiny.t5_encoder(len(t5_tokenizer), width=T5_WIDTH),
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
