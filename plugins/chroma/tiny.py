"""A miniature Chroma with random weights, saved in diffusers layout, for tests and examples.

It has the real architecture (double- and single-stream blocks, approximator, T5, the 16-channel
VAE with an 8x downscale) at a few hundred thousand parameters, so the real loading code
(``from_pretrained`` on a diffusers folder) is what tests and the README example exercise.
"""

from __future__ import annotations

from pathlib import Path

from tuner.plugins.fluxlike.tiny import transformer_config
from tuner.testing import tiny


def build_tiny_chroma(folder: str | Path, seed: int = 0, **transformer: int | tuple[int, ...]) -> Path:
    """Write a random miniature Chroma pipeline (all five components) to ``folder``.

    Keyword arguments override the transformer's config (benchmarks use a mid-size one); keep
    ``joint_attention_dim`` at 32, the miniature T5's width.
    """
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = tiny.t5_tokenizer()
    config = transformer_config(approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)
    pipe = ChromaPipeline(
        transformer=ChromaTransformer2DModel(**{**config, **transformer}),
        text_encoder=tiny.t5_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        vae=tiny.vae(),
        scheduler=tiny.scheduler(),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
