"""Around transformers 5.24's Qwen2-VL processor, in one place.

``Qwen2VLProcessor`` cannot be built or loaded without torchvision, even for still images: its
video half (``Qwen2VLVideoProcessor``) requires torchvision, ``from_pretrained`` raises ImportError,
and the constructor fails on the video mapping's placeholder (``AttributeError: _extra_content``).
Qwen-Image-Edit needs only the image half (``Qwen2VLImageProcessorPil`` runs on PIL and numpy), so
without torchvision the processor is assembled from its tokenizer and image processor with no
video half. tests/test_qwen_image.py shows the bug (and will say when a release fixes it)."""

from __future__ import annotations

import importlib.util
from typing import Any


def torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


def processor_folder(source: str, revision: str | None) -> str:
    """The model's ``processor`` folder on disk (downloaded from the hub when ``source`` is an id)."""
    from pathlib import Path

    if Path(source).is_dir():
        return str(Path(source) / "processor")
    from huggingface_hub import snapshot_download

    return str(Path(snapshot_download(source, revision=revision, allow_patterns=["processor/*"])) / "processor")


def still_image_processor(folder: str) -> Any:
    """A ``Qwen2VLProcessor`` for text and still images (no video half), from the processor folder's
    tokenizer and image processor configuration, as the pipelines call it."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)  # __init__ insists on the video half
    processor.tokenizer, processor.image_processor = tokenizer, Qwen2VLImageProcessorPil.from_pretrained(folder)
    processor.video_processor, processor.chat_template = None, None
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)
    return processor
