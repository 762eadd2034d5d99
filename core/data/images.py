"""The dataset: a folder of images with same-stem ``.txt`` captions, read into aspect-ratio buckets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner.core.data.buckets import Bucket, crop_box
from tuner.core.errors import DataError


def unreadable_errors() -> tuple[type[Exception], ...]:
    """What reading an unusable image raises: a damaged or foreign file, or one past PIL's
    decompression-bomb limit (counted and skipped like the others, never the end of a run)."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


MASK_STEM = ".mask"  # cat.mask.png beside cat.png: its loss weights, never a training image


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    others: tuple[str, ...] = ()  # more captions of the image: one of all is drawn per sample
    mask: Path | None = None  # its loss mask (white: train, black: ignore), when it has one that matters
    reference: Path | None = None  # edit pairs: the image the edit starts from (this image is its target)

    @property
    def captions(self) -> tuple[str, ...]:
        return (self.caption, *self.others)


def caption_from_filename(image: Path) -> str:
    """SimpleTuner's ``filename`` strategy: the stem, underscores as spaces."""
    return " ".join(image.stem.replace("_", " ").split())


def image_files(root: Path, not_files: list[Path] | None = None, with_masks: bool = False) -> list[Path]:
    """Images under ``root``, sorted: subfolders and symlinked subfolders followed (each real
    folder once, so link loops end), hidden files and folders (``.ipynb_checkpoints``, macOS
    ``._*`` files) skipped. Only regular files count: a named pipe, a device or a broken link named
    like an image is never opened (reading a pipe waits forever); ``not_files`` collects them."""
    import os

    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if Path(name).stem.lower().endswith(MASK_STEM) and not with_masks:  # a loss mask, not an image
                continue
            path = Path(folder) / name
            if path.is_file():  # follows links: a regular file, or a link to one
                found.append(path)
            elif not_files is not None:
                not_files.append(path)
    return sorted(found)


def read_caption(path: Path, warn: Callable[[str], None], lines: bool = False) -> str:
    """A caption file's text on one line (``lines``: its lines kept): UTF-8 (with or without BOM),
    UTF-16 with a BOM, or UTF-16 without one (text full of NULs as UTF-8 is tried as UTF-16 LE and
    BE); undecodable bytes are replaced with a warning, and a file that is no text in any of them is
    named and left out."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    elif b"\x00" in raw:  # no text has NULs; UTF-16 of mostly-ASCII text is full of them
        text = _utf16_without_bom(raw)
        if text is None:
            warn(f"caption {path} is not text (NUL bytes, neither UTF-8 nor UTF-16); it was left out")
            return ""
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            warn(f"caption {path} is not UTF-8; undecodable bytes were replaced")
            text = raw.decode("utf-8", errors="replace")
    return text if lines else " ".join(text.split())


def _utf16_without_bom(raw: bytes) -> str | None:
    """UTF-16 text written without a byte-order mark (some Windows tools), or None. Both byte orders
    are tried; the one that reads as more ASCII wins (little-endian, Windows' own, on a tie)."""
    if len(raw) % 2:
        return None
    readings = []
    for encoding in ("utf-16-le", "utf-16-be"):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        if "\x00" not in text and all(c.isprintable() or c.isspace() for c in text):
            readings.append(text)
    return max(readings, key=lambda text: sum(c.isascii() for c in text), default=None)


@dataclass(frozen=True)
class CaptionRule:
    """Where an image's caption comes from: ``textfile`` (the caption metadata file where it lists
    the image, else a same-stem file with the first of ``extensions`` present), ``filename`` or
    ``instanceprompt`` (``instance_prompt`` for every image); ``prefix`` (a trigger word) goes
    before each."""

    strategy: str = "textfile"
    instance_prompt: str = ""
    extensions: tuple[str, ...] = (".txt", ".caption")
    prefix: str = ""
    lines: str = "each"  # a caption file's lines: each its own caption, or joined into one
    # caption_metadata: image path (relative to the folder, or its name) -> its captions
    metadata: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def listed(self, image: Path, root: Path) -> Item | None:
        """The image's captions from the metadata file, if it lists the image."""
        captions = self.metadata.get(image.relative_to(root).as_posix()) or self.metadata.get(image.name)
        if not captions:
            return None
        return Item(image, self(captions[0]), tuple(self(c) for c in captions[1:]))

    def __call__(self, caption: str) -> str:
        return " ".join(part for part in (self.prefix, caption) if part)

    def item(self, image: Path, text: str) -> Item:
        """The image with the caption(s) a caption file's ``text`` holds, the prefix before each."""
        lines = [" ".join(line.split()) for line in text.splitlines()] if self.lines == "each" else []
        captions = [line for line in lines if line] or [" ".join(text.split())]
        return Item(image, self(captions[0]), tuple(self(c) for c in captions[1:]))


def caption_rule(config: Any) -> CaptionRule:
    """The :class:`CaptionRule` of a run's (or a dataset's) config."""
    return CaptionRule(
        config.caption_strategy,
        config.instance_prompt or "",
        tuple(e.lower() for e in config.caption_extensions),
        " ".join((config.caption_prefix or "").split()),
        config.caption_lines,
        read_caption_metadata(config.caption_metadata) if config.caption_metadata else {},
    )


def read_caption_metadata(path: str | Path) -> dict[str, tuple[str, ...]]:
    """``caption_metadata``: a JSON object of image path -> caption or list of captions, or JSON
    lines of ``{"file_name": ..., "caption" or "text": caption or list}`` (Hugging Face's
    imagefolder ``metadata.jsonl``). A file that cannot be read is a one-line error naming it."""
    import json

    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
            pairs = [(row["file_name"], row["caption"] if "caption" in row else row["text"]) for row in rows]
        else:
            pairs = list(json.loads(raw).items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        what = f"no {exc} field" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
        raise DataError(
            f"caption_metadata {path}: cannot read it ({what}); write a JSON object of file -> caption(s), or "
            'JSON lines of {"file_name": ..., "caption": ...}'
        ) from None
    table = {}
    for name, captions in pairs:
        listed = [captions] if isinstance(captions, str) else list(captions or [])
        table[str(name).replace("\\", "/")] = tuple(" ".join(str(c).split()) for c in listed if str(c).strip())
    return table


def scan_dataset(
    data_dir: str | Path,
    warn: Callable[[str], None],
    captions: CaptionRule | str = "textfile",
    mask_dir: str | Path | None = None,
) -> list[Item]:
    """List the images under ``data_dir`` (see :func:`image_files`) with their captions.

    A missing or empty caption (a same-stem file with one of the rule's extensions, any case, the
    first in the rule's order winning) trains with an empty caption (one warning with the count).
    An empty folder is an error.
    """
    rule = captions if isinstance(captions, CaptionRule) else CaptionRule(captions)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir {root} is not a folder")
    not_files: list[Path] = []
    images = image_files(root, not_files)
    if not_files:
        shown = ", ".join(str(p.relative_to(root)) for p in not_files[:3]) + (" ..." if len(not_files) > 3 else "")
        warn(
            f"skipped {len(not_files)} file(s) in {root} that are no regular files (a pipe, a device, a broken link): {shown}"
        )
    if not images:
        raise DataError(f"data_dir {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if rule.strategy != "textfile":
        given = (lambda image: caption_from_filename(image)) if rule.strategy == "filename" else None
        items = [Item(image, rule(given(image) if given else rule.instance_prompt)) for image in images]
        return with_masks(items, root, warn, mask_dir)
    found: dict[tuple[Path, str], list[tuple[int, Path]]] = {}  # (folder, stem) -> caption files by rank
    for folder in {image.parent for image in images}:
        for file in folder.iterdir():
            suffix = file.suffix.lower()
            if suffix in rule.extensions and not file.name.startswith("."):
                if file.is_file():
                    found.setdefault((folder, file.stem), []).append((rule.extensions.index(suffix), file))
                else:  # a folder, a pipe or a broken link named like a caption: never read
                    warn(f"caption {file} is not a regular file; its image trains without a caption")
    items, uncaptioned = [], []
    for image in images:
        listed = rule.listed(image, root) if rule.metadata else None
        if listed is not None:  # the metadata file names it: its captions, whatever files lie beside it
            items.append(listed)
            continue
        caption_file = min(found.get((image.parent, image.stem), [(0, None)]))[1]
        item = rule.item(image, read_caption(caption_file, warn, lines=True) if caption_file is not None else "")
        if item.caption == rule(""):
            uncaptioned.append(image.name)
        items.append(item)
    if uncaptioned:
        shown = ", ".join(uncaptioned[:3]) + (" ..." if len(uncaptioned) > 3 else "")
        named = " or ".join(rule.extensions)
        warn(
            f"{len(uncaptioned)} image(s) in {root} have no caption (no {named} file, or an empty one) and train "
            f"with {'only the caption_prefix' if rule.prefix else 'an empty caption'}: {shown}"
        )
    return with_masks(items, root, warn, mask_dir)


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` as the image will be trained (EXIF rotation applied), from its header.

    Raises one of :data:`UNREADABLE` for an unreadable file (the caller skips it)."""
    from PIL import Image

    with Image.open(path) as img:  # beyond PIL's decompression-bomb limit: DecompressionBombError
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)  # 5-8: stored rotated by 90 degrees
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def as_rgb(img: Any, background: str = "white", on_transparency: Callable[[], None] | None = None) -> Any:
    """An 8-bit RGB image of any PIL mode. ``convert("RGB")`` alone clips 16-bit and 32-bit greyscale
    (``I;16``, ``I``) and float (``F``) images to white and drops transparency, leaving whatever
    colour the transparent pixels hold: those are scaled to 0-255, and transparent images are
    composited on ``background`` (``on_transparency`` is called so the run can say so once)."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else float(values.max(initial=0.0))
        if img.mode == "F" and top <= 1.0:
            top = 1.0  # float images in [0, 1]
        elif img.mode == "I" and top <= 65535:
            top = 65535.0 if top > 255 else 255.0  # 16-bit PNGs open as "I"
        scaled = np.clip(values / max(top, 1e-12) * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    transparent = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if transparent:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some pixel is (partly) transparent
            if on_transparency is not None:
                on_transparency()
            canvas = Image.new("RGBA", rgba.size, background)
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return rgba.convert("RGB")
    return img.convert("RGB")


def load_image(
    path: Path,
    bucket: Bucket,
    crop_style: str = "center",
    offset: float = 0.5,
    background: str = "white",
    on_transparency: Callable[[], None] | None = None,
):
    """Read an image as a ``[3, height, width]`` float tensor in [-1, 1] for ``bucket``: 8-bit RGB
    (see :func:`as_rgb`), upright (EXIF), resized to cover the bucket, cropped by the remainder (see
    :func:`crop_box`).

    Raises ``OSError``/``ValueError`` for an unreadable file (the caller skips it).
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = as_rgb(ImageOps.exif_transpose(img), background, on_transparency)
        width, height, left, top = crop_box(img.width, img.height, bucket, crop_style, offset)
        img = img.resize((width, height), Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + bucket.width, top + bucket.height))
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def with_masks(
    items: list[Item], root: Path, warn: Callable[[str], None], mask_dir: str | Path | None = None
) -> list[Item]:
    """Each item with its mask, said with a count: a same-stem ``.mask`` image beside it (any image
    suffix), or with ``mask_dir`` the image of the same relative path and stem there (``.mask`` or
    not: SimpleTuner's mask datasets name masks like their images). A mask that is white everywhere
    changes nothing and is dropped (the image trains as without one); an image whose mask is black
    everywhere would train nothing and is left out; an unreadable mask leaves its image out, named."""
    from PIL import Image

    masks = {}
    if mask_dir is not None:
        if not Path(mask_dir).is_dir():
            raise DataError(f"mask_dir {mask_dir} is not a folder")
        for file in image_files(Path(mask_dir), with_masks=True):
            relative = file.relative_to(mask_dir).parent
            stem = Path(file.stem)
            name = stem.stem if stem.suffix.lower() == MASK_STEM else file.stem
            masks[(root / relative, name)] = file
    for folder in {item.image.parent for item in items}:
        for file in folder.iterdir():
            stem = Path(file.stem)
            if file.suffix.lower() in IMAGE_SUFFIXES and stem.suffix.lower() == MASK_STEM and file.is_file():
                masks.setdefault((folder, stem.stem), file)
    if not masks:
        return items
    kept, white, black, unreadable = [], 0, [], []
    for item in items:
        mask = masks.get((item.image.parent, item.image.stem))
        if mask is None:
            kept.append(item)
            continue
        try:
            with Image.open(mask) as img:
                low, high = img.convert("L").getextrema()
        except unreadable_errors() as exc:
            unreadable.append(f"{mask.name} ({type(exc).__name__})")
            continue
        if high == 0:
            black.append(item.image.name)
        elif low == 255:
            white += 1
            kept.append(item)
        else:
            kept.append(replace(item, mask=mask))
    with_mask = sum(1 for item in kept if item.mask is not None)
    warn(
        f"{with_mask} of {len(items)} image(s) in {root} have a loss mask (<name>.mask.png; white trains, black is "
        "ignored); the others train everywhere" + (f"; {white} all-white mask(s) change nothing" if white else "")
    )
    if black:
        warn(
            f"left out {len(black)} image(s) whose mask is black everywhere (nothing to train): {', '.join(black[:3])}"
        )
    if unreadable:
        warn(f"left out {len(unreadable)} image(s) whose mask cannot be read: {', '.join(unreadable[:3])}")
    return kept


def load_mask(mask: Path, image: Path, bucket: Bucket, crop_style: str, offset: float, notes: list[str]):
    """The loss mask of ``image`` as a ``[1, height, width]`` float tensor in [0, 1] for ``bucket``:
    upright (EXIF), resized to the image's own size if it differs (said in ``notes``), then scaled
    and cropped exactly as :func:`load_image` does the image."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(image) as img:
        size = ImageOps.exif_transpose(img).size
    with Image.open(mask) as raw:
        weights = ImageOps.exif_transpose(raw).convert("L")
        if weights.size != size:
            notes.append(f"{mask.name} ({weights.width}x{weights.height}, image {size[0]}x{size[1]})")
            weights = weights.resize(size, Image.Resampling.BILINEAR)
        width, height, left, top = crop_box(size[0], size[1], bucket, crop_style, offset)
        weights = weights.resize((width, height), Image.Resampling.BILINEAR)
        weights = weights.crop((left, top, left + bucket.width, top + bucket.height))
        array = np.asarray(weights, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None].contiguous()
