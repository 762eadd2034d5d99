"""Edit pairs: a training image (the target) and the reference image the edit starts from, paired
by name from ``conditioning_data_dir`` (SimpleTuner's conditioning datasets). The family sizes the
reference for its VAE and its text encoder (``reference_sizes``); both encodings are cached, the
reference's latents with the target's, the instruction's with the reference's identity in its key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuner.core.data.images import IMAGE_SUFFIXES, Item, as_rgb, image_files


def with_references(items: list[Item], root: Path, folder: str | Path, warn: Callable[[str], None]) -> list[Item]:
    """Each item with the image of the same relative path and stem under ``folder`` (any image
    suffix); items without one are skipped, with a count."""
    references = {}
    for file in image_files(Path(folder)):
        references[(root / file.relative_to(folder).parent, file.stem)] = file
    paired, lacking = [], []
    for item in items:
        reference = references.get((item.image.parent, item.image.stem))
        if reference is None:
            lacking.append(item.image.name)
        else:
            paired.append(replace(item, reference=reference))
    if lacking:
        shown = ", ".join(lacking[:3]) + (" ..." if len(lacking) > 3 else "")
        warn(
            f"skipped {len(lacking)} image(s) without a reference image in {folder} ({', '.join(IMAGE_SUFFIXES)}): {shown}"
        )
    return paired


def reference_sizes(host: Any, config: Any, path: Path) -> dict[str, tuple[int, int]]:
    """The family's sizes for this reference image (``{"vae": (w, h), "encoder": (w, h)}``)."""
    from tuner.core.data.images import image_size

    width, height = image_size(path)
    return host.provide("reference_sizes", config=config, width=width, height=height)


def open_reference(path: Path, size: tuple[int, int] | None = None) -> Any:
    """The reference as a PIL image, upright and RGB; at ``size``, resized as diffusers' image
    processor resizes it (Lanczos), no crop: what the edit pipelines hand their encoders."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = as_rgb(ImageOps.exif_transpose(img), "white", None)
        return img.resize(size, Image.Resampling.LANCZOS) if size is not None else img.copy()


def reference_pixels(path: Path, size: tuple[int, int]) -> Any:
    """``[3, h, w]`` in [-1, 1]: the VAE's input."""
    import numpy as np
    import torch

    array = np.asarray(open_reference(path, size), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
