"""tuner's public testing kit for plugin authors.

* :func:`make_host`: a plugin manager with only the plugins under test (and the core's defaults).
* :mod:`tuner.testing.tiny`: random miniature text encoders, tokenizers built in memory, the
  16-channel VAE and a flow-matching scheduler, to build a tiny model in diffusers layout offline.
* :func:`shapes_dataset`: a dozen captioned images drawn on the spot.
* :class:`tuner.testing.contract.FamilyContract`: contract tests a model-family plugin must pass.
* :mod:`tuner.testing.family`: the kit's own miniature family (``testing``) and its builder, which
  :class:`tuner.testing.optimizer_contract.OptimizerContract` trains: no bundled family needed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def make_host(*plugins: Any, family: str | None = None, installed: bool = False):
    """A :class:`tuner.core.host.manager.PluginHost` with ``plugins`` (module objects or ``(name, obj)``
    pairs) registered like installed ones; ``installed=True`` adds the entry-point plugins too."""
    from tuner.core.api import PluginHost

    pairs = [p if isinstance(p, tuple) else (getattr(p, "__name__", type(p).__name__), p) for p in plugins]
    return PluginHost(family, extra_plugins=pairs, entry_points=installed)


def draw_shape(
    shape: str,
    colour: tuple[int, int, int],
    background: tuple[int, int, int],
    size: int = 128,
    width: int | None = None,
):
    """A ``width x size`` image (square unless ``width``) with the shape in its middle."""
    from PIL import Image, ImageDraw

    width = width or size
    image = Image.new("RGB", (width, size), background)
    pen = ImageDraw.Draw(image)
    left = (width - size) / 2
    lo, hi = size * 0.22, size * 0.78
    if shape == "circle":
        pen.ellipse((left + lo, lo, left + hi, hi), fill=colour)
    elif shape == "square":
        pen.rectangle((left + lo, lo, left + hi, hi), fill=colour)
    else:
        pen.polygon(((left + size / 2, lo), (left + hi, hi), (left + lo, hi)), fill=colour)
    return image


def shapes_dataset(folder: str | Path, size: int = 128, wide_and_tall: int = 0) -> Path:
    """12 square images (every shape in every colour, alternating backgrounds) with .txt captions,
    plus ``wide_and_tall`` images at 2:1 and as many at 1:2 (for aspect-ratio buckets)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    combos = list(itertools.product(SHAPES, COLOURS))
    for index, (shape, colour) in enumerate(combos):
        background = "white" if index % 2 == 0 else "black"
        name = f"{index:02d}_{colour}_{shape}"
        draw_shape(shape, COLOURS[colour], BACKGROUNDS[background], size).save(folder / f"{name}.png", optimize=True)
        (folder / f"{name}.txt").write_text(f"a {colour} {shape} on a {background} background\n")
    for index in range(wide_and_tall):
        shape, colour = combos[(5 * index + 1) % len(combos)]
        for kind, (width, height) in (("wide", (2 * size, size)), ("tall", (size, 2 * size))):
            name = f"{kind}_{index:02d}_{colour}_{shape}"
            image = draw_shape(shape, COLOURS[colour], BACKGROUNDS["white"], min(width, height), max(width, height))
            if kind == "tall":
                image = image.transpose(Image.Transpose.ROTATE_90)
            image.save(folder / f"{name}.png", optimize=True)
            (folder / f"{name}.txt").write_text(f"a {colour} {shape}, {kind} picture\n")
    return folder
