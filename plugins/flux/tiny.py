"""A miniature Flux.1 with random weights (CLIP + T5 + VAE + transformer), saved in diffusers layout."""

from __future__ import annotations

from pathlib import Path

from tuner.plugins.fluxlike.tiny import transformer_config
from tuner.testing import tiny


def build_tiny_flux(folder: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a random miniature Flux pipeline to ``folder``: dev-like with ``guidance_embeds``,
    schnell-like without."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    t5_tokenizer, clip_tokenizer = tiny.t5_tokenizer(), tiny.clip_tokenizer()
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            **transformer_config(pooled_projection_dim=tiny.TEXT_WIDTH, guidance_embeds=guidance_embeds)
        ),
        text_encoder=tiny.clip_encoder(len(clip_tokenizer)),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny.t5_encoder(len(t5_tokenizer)),
        tokenizer_2=t5_tokenizer,
        vae=tiny.vae(),
        scheduler=tiny.scheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
