"""A miniature Flux.2 klein with random weights (Qwen3 + tokenizer built in memory, the 32-channel
VAE with batch-norm statistics, a 1x1-patch transformer), saved in diffusers layout."""

from __future__ import annotations

from pathlib import Path

ENCODER_WIDTH = 16  # the transformer's joint_attention_dim is three encoder layers side by side


def build_tiny_flux2(folder: str | Path, seed: int = 0, guidance_embeds: bool = False) -> Path:
    """Write a random miniature Flux2KleinPipeline to ``folder``; ``guidance_embeds`` adds dev's
    guidance embedding to the transformer."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    from tuner.testing import tiny

    torch.manual_seed(seed)
    tokenizer = tiny.qwen_tokenizer()
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    with torch.no_grad():  # statistics that are not the identity, so normalisation is visible
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    transformer = Flux2Transformer2DModel(
        in_channels=128,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * ENCODER_WIDTH,
        timestep_guidance_channels=32,
        axes_dims_rope=(2, 2, 6, 6),
        guidance_embeds=guidance_embeds,
    )
    pipe = Flux2KleinPipeline(
        scheduler=tiny.scheduler(),
        vae=vae,
        text_encoder=tiny.qwen3_encoder(len(tokenizer), width=ENCODER_WIDTH),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
