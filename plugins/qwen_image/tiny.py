"""A miniature Qwen-Image (or Qwen-Image-Edit) with random weights, saved in diffusers layout: the
3D VAE with its latent statistics, a two-block transformer and a narrow Qwen2.5-VL with a one-layer
vision tower, its tokenizer and processor built in memory."""

from __future__ import annotations

import json
from pathlib import Path

ENCODER_WIDTH = 16
# the words of the pipelines' prompt templates: whole-word tokens, as in Qwen's real vocabulary, so
# the templates tokenize to the count the pipelines drop (34 for text-to-image, 64 for edits)
TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text "
    "spatial relationships of objects and background key features input then explain how instruction "
    "should alter or modify Generate a new that meets requirements while maintaining consistency with "
    "original where appropriate Picture"
).split() + ["(", "),", "'s"]
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def qwen_vl_tokenizer():
    """Qwen's byte-level BPE (:func:`tuner.testing.tiny.qwen_tokenizer`) with the template words and
    the vision special tokens."""
    from tuner.testing import tiny

    tokenizer = tiny.qwen_tokenizer(extra_words=TEMPLATE_WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    return tokenizer


def save_processor(tokenizer, folder: Path) -> None:
    """Write a Qwen2-VL processor folder for small images (at most 64 patches of 14 px: 16 vision
    tokens after the 2x2 merge): its tokenizer and image processor configuration, as the real
    model's ``processor`` folder holds them (a processor object cannot be built without torchvision:
    tuner.plugins.qwen_image.fixes)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28).save_pretrained(folder)


def qwen_vl_encoder(tokenizer, width: int = ENCODER_WIDTH):
    """A narrow ``Qwen2_5_VLForConditionalGeneration``: two text layers, one vision block."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tuner.testing import tiny

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in VISION_TOKENS}
    text = tiny.narrow_decoder(len(tokenizer), width, 2)
    text["bos_token_id"] = text["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": width,
        "fullatt_block_indexes": [0],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny_qwen_image(folder: str | Path, seed: int = 0, edit: bool = False) -> Path:
    """Write a random miniature QwenImagePipeline (or QwenImageEditPipeline) to ``folder``."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPipeline, QwenImagePipeline, QwenImageTransformer2DModel

    from tuner.testing import tiny

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=[round(0.1 * v, 4) for v in torch.randn(16).tolist()],
        latents_std=[round(0.5 + v, 4) for v in torch.rand(16).tolist()],
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=ENCODER_WIDTH,
        axes_dims_rope=(4, 6, 6),
    )
    tokenizer = qwen_vl_tokenizer()
    encoder = qwen_vl_encoder(tokenizer)
    scheduler = tiny.scheduler()
    if edit:
        pipe = QwenImageEditPipeline(scheduler, vae, encoder, tokenizer, None, transformer)
    else:
        pipe = QwenImagePipeline(scheduler, vae, encoder, tokenizer, transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    if edit:
        save_processor(tokenizer, Path(folder) / "processor")
        index = Path(folder) / "model_index.json"
        entries = json.loads(index.read_text())
        entries["processor"] = ["transformers", "Qwen2VLProcessor"]
        index.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return Path(folder)


def edit_pairs(folder: str | Path, count: int = 8, size: int = 64) -> Path:
    """A dataset of edit pairs: ``folder/targets`` (images with the instruction as caption) and
    ``folder/references`` (the image each edit starts from, same name): the shapes dataset's
    images, each edit inverting the colours."""
    from PIL import Image, ImageOps

    from tuner.testing import shapes_dataset

    shapes = shapes_dataset(Path(folder) / "shapes", size=size)
    targets, references = Path(folder) / "targets", Path(folder) / "references"
    targets.mkdir(parents=True, exist_ok=True)
    references.mkdir(parents=True, exist_ok=True)
    for image in sorted(shapes.glob("*.png"))[:count]:
        with Image.open(image) as img:
            img.convert("RGB").save(references / image.name)
            ImageOps.invert(img.convert("RGB")).save(targets / image.name)
        (targets / image.with_suffix(".txt").name).write_text("invert the colors")
    import shutil

    shutil.rmtree(shapes)
    return Path(folder)
