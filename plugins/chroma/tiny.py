"""A miniature Chroma with random weights, saved in diffusers layout, for tests and examples.

It has the real architecture (double- and single-stream blocks, approximator, T5, the 16-channel
VAE with an 8x downscale) at a few hundred thousand parameters, so the real loading code
(``from_pretrained`` on a diffusers folder) is what tests and the README example exercise.
"""

from __future__ import annotations

from pathlib import Path

# Words the miniature tokenizer knows; any other word becomes <unk>.
VOCABULARY = (
    "a an the of on in with and photo picture drawing image small big large tiny "
    "red green blue yellow orange purple white black gray pink brown cyan "
    "circle square triangle ring cross stripe stripes dot dots shape shapes "
    "background centered left right top bottom corner two three several bright dark "
    "cat dog tree house sky sun moon flower car person face blurry sharp detailed"
).split()

TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
    approximator_num_channels=8,
    approximator_hidden_dim=32,
    approximator_layers=1,
)


def build_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -float(i + 1)) for i, word in enumerate(VOCABULARY)]
    return T5Tokenizer(vocab=pieces)


def build_tiny_chroma(folder: str | Path, seed: int = 0, **transformer: int | tuple[int, ...]) -> Path:
    """Write a random miniature Chroma pipeline (all five components) to ``folder``.

    Keyword arguments override the transformer's config (benchmarks use a mid-size one); keep
    ``joint_attention_dim`` at 32, the miniature T5's width.
    """
    import torch
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    transformer = ChromaTransformer2DModel(**{**TRANSFORMER, **transformer})
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Chroma's real scheduler: resolution-dependent shift at inference
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = ChromaPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
