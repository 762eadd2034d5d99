"""Rebuild the bundled example assets: the tiny random Chroma and Flux, and the shapes dataset.

    python examples/build_examples.py

Both are committed, so the README example runs offline without this script; it documents exactly
how they were made (random weights, seed 0) and lets you regenerate them.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(
    shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int = 128
) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    lo, hi = size * 0.22, size * 0.78
    if shape == "circle":
        pen.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "square":
        pen.rectangle((lo, lo, hi, hi), fill=colour)
    else:
        pen.polygon(((size / 2, lo), (hi, hi), (lo, hi)), fill=colour)
    return image


def build_dataset(folder: Path) -> None:
    """12 images: every shape in every colour, alternating backgrounds, with captions."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for index, (shape, colour) in enumerate(itertools.product(SHAPES, COLOURS)):
        background = "white" if index % 2 == 0 else "black"
        name = f"{index:02d}_{colour}_{shape}"
        draw_shape(shape, COLOURS[colour], BACKGROUNDS[background]).save(folder / f"{name}.png", optimize=True)
        (folder / f"{name}.txt").write_text(f"a {colour} {shape} on a {background} background\n")


def main() -> None:
    from tuner.plugins.chroma.tiny import build_tiny_chroma
    from tuner.plugins.flux.tiny import build_tiny_flux

    build_dataset(HERE / "data" / "shapes")
    for name, build in (("tiny-chroma", build_tiny_chroma), ("tiny-flux", build_tiny_flux)):
        model = HERE / "models" / name
        if model.exists():
            shutil.rmtree(model)
        build(model, seed=0)
        print(f"wrote {model}")


if __name__ == "__main__":
    main()
