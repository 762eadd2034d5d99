"""A miniature Flux.2 with random weights, saved in diffusers layout: klein (Qwen3 + its tokenizer)
or dev (Mistral3 + a tokenizer with Mistral's chat template, a guidance embedding), the 32-channel VAE with batch-norm
statistics and a 1x1-patch transformer, every tokenizer built in memory."""

from __future__ import annotations

from pathlib import Path

ENCODER_WIDTH = 16  # the transformer's joint_attention_dim is three encoder layers side by side


def build_tiny_flux2(folder: str | Path, seed: int = 0, flavour: str = "klein") -> Path:
    """Write a random miniature Flux2KleinPipeline (``flavour="klein"``) or Flux2Pipeline
    (``"dev"``) to ``folder``."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

    from tuner.testing import tiny

    torch.manual_seed(seed)
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
        guidance_embeds=flavour == "dev",
    )
    if flavour == "dev":
        tokenizer = tiny.mistral_tokenizer()  # in place of Mistral's processor: text-only prompts
        encoder = tiny.mistral3_encoder(len(tokenizer), width=ENCODER_WIDTH)
        pipe = Flux2Pipeline(tiny.scheduler(), vae, encoder, tokenizer, transformer)
    else:
        tokenizer = tiny.qwen_tokenizer()
        encoder = tiny.qwen3_encoder(len(tokenizer), width=ENCODER_WIDTH)
        pipe = Flux2KleinPipeline(tiny.scheduler(), vae, encoder, tokenizer, transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
