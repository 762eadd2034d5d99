"""Rebuild the bundled example assets: the tiny random Chroma, Flux, Flux.2 (klein) and Qwen-Image (and -Edit), and the shapes dataset.

    python examples/build_examples.py

Both are committed, so the README example runs offline without this script; it documents exactly
how they were made (random weights, seed 0) and lets you regenerate them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_dataset(folder: Path) -> None:
    """12 square images (every shape in every colour, alternating backgrounds), 4 at 2:1 and 4 at
    1:2, with captions: three aspect-ratio buckets."""
    from tuner.testing import shapes_dataset

    if folder.exists():
        shutil.rmtree(folder)
    shapes_dataset(folder, wide_and_tall=4)


def main() -> None:
    from tuner.plugins.chroma.tiny import build_tiny_chroma
    from tuner.plugins.flux.tiny import build_tiny_flux
    from tuner.plugins.flux2.tiny import build_tiny_flux2
    from tuner.plugins.qwen_image.tiny import build_tiny_qwen_image, edit_pairs

    build_dataset(HERE / "data" / "shapes")
    if (HERE / "data" / "edit-pairs").exists():
        shutil.rmtree(HERE / "data" / "edit-pairs")
    edit_pairs(HERE / "data" / "edit-pairs", count=8, size=64)
    for name, build in (
        ("tiny-chroma", build_tiny_chroma),
        ("tiny-flux", build_tiny_flux),
        ("tiny-flux2", build_tiny_flux2),
        ("tiny-qwen-image", build_tiny_qwen_image),
        ("tiny-qwen-image-edit", lambda folder, seed: build_tiny_qwen_image(folder, seed, edit=True)),
    ):
        model = HERE / "models" / name
        if model.exists():
            shutil.rmtree(model)
        build(model, seed=0)
        print(f"wrote {model}")


if __name__ == "__main__":
    main()
