"""On-disk caches of VAE latents and text encodings, reused when the model and settings match.

Layout: ``<cache_dir>/<kind>/<fingerprint>/<entry>.safetensors`` with ``fingerprint.json`` beside
the entries. The fingerprint hashes the model identity and every setting that changes what an
entry holds (core ones plus each plugin's ``cache_fingerprint``). Latent entries are keyed by the
image's path, size and modification time and by its bucket and crop, so changing the bucket
settings re-encodes exactly the images whose bucket changed; text entries by the text itself.
Encoders are loaded only when an entry is missing and are released before training starts.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.core.config.keys.model import NO_QUANTIZATION
from tuner.core.config.values import model_source
from tuner.core.data.buckets import Bucket, BucketPlan, bucket_sizes, plan
from tuner.core.data.images import Item, image_size, load_image, load_mask, unreadable_errors
from tuner.core.data.sampler import step_seed
from tuner.core.errors import DataError
from tuner.core.io import atomic_write, remove_stale_temporaries, save_safetensors

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tuner.core.config.values import Config
    from tuner.core.host.manager import PluginHost

# 2: latent entries keyed by bucket and crop; 3: 16-bit, float and transparent images decoded anew
CACHE_FORMAT = 3
VAE_BATCH = 4
TEXT_BATCH = 8
CAPTION_DRAW = 0xCA9  # step_seed's purpose tag for drawing one of an image's captions


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tuner"


class TensorCache:
    """One folder of safetensors entries sharing a fingerprint."""

    def __init__(self, root: Path, kind: str, fingerprint: dict[str, Any]):
        self.kind = kind
        self.damaged: list[str] = []  # entries found unreadable (and removed) by has()
        self.dir = root / kind / _digest(fingerprint)[:20]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.removed_temporaries = remove_stale_temporaries(self.dir)  # left by a killed writer
        marker = self.dir / "fingerprint.json"
        if not marker.exists():
            atomic_write(marker, lambda tmp: Path(tmp).write_text(json.dumps(fingerprint, indent=1, default=str)))

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """Whether a readable entry exists. Its header is read (which checks that the file covers
        every tensor it declares), so an entry cut off by a crash or a full disk is found when the
        cache is opened, removed and encoded again, instead of failing the run when drawn."""
        path = self.path(key)
        if not path.is_file():
            return False
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception:  # SafetensorError: truncated or garbage
            path.unlink(missing_ok=True)
            self.damaged.append(path.name)
            return False
        return True

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """An entry's tensors; one whose header is sound but whose values are not numbers (NaN or
        infinity, written by hand or by a broken encoder) is removed and named, so the next start
        encodes it again instead of training on it."""
        from safetensors.torch import load_file

        path = self.path(key)
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise DataError(
                f"{self.kind} cache entry {path} is unreadable ({exc}); delete {self.dir} to rebuild it"
            ) from None
        bad = _not_finite(tensors)
        if bad:
            path.unlink(missing_ok=True)
            raise DataError(
                f"{self.kind} cache entry {path} held NaN or infinite values ({', '.join(bad)}); it was removed "
                "and is encoded again when the run starts again"
            )
        return tensors

    def tensor_names(self, key: str) -> set[str]:
        """Names stored in an entry, read from the file header only."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path(key)), framework="pt") as handle:
                return set(handle.keys())
        except Exception as exc:
            raise DataError(
                f"{self.kind} cache entry {self.path(key)} is unreadable ({exc}); delete {self.dir} to rebuild it"
            ) from None

    def save(self, key: str, tensors: dict[str, torch.Tensor], source: str = "") -> None:
        """Store an entry; values that are not numbers are never cached (``source`` names what was
        encoded, for the message)."""
        bad = _not_finite(tensors)
        if bad:
            raise DataError(
                f"encoding {source or key} gave NaN or infinite values ({', '.join(bad)}); with fp16 the VAE or "
                "text encoder can overflow: use bf16 or no (mixed_precision)"
            )
        save_safetensors(self.path(key), tensors)


def _not_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, value in tensors.items() if value.is_floating_point() and not bool(value.isfinite().all())]


def image_key(path: Path) -> str:
    stat = path.stat()
    return _digest([str(path.resolve()), stat.st_size, stat.st_mtime_ns])[:32]


def text_key(text: str) -> str:
    return _digest(text)[:32]


def conditioning_key(text: str, reference: Path | None = None) -> str:
    """A text's cache key; with an edit pair's reference image, that image's identity too (the
    encoder sees it: a changed reference re-encodes only its own pairs)."""
    return text_key(text) if reference is None else _digest([text, image_key(reference)])[:32]


def _model_identity(config: Config, host: PluginHost, component: str) -> dict[str, Any]:
    source = model_source(config, host.family.flavours)
    identity: dict[str, Any] = {"family": host.family.name, "source": source, "revision": config.revision}
    folder = Path(source)
    if folder.is_dir():  # a local model: its files' sizes and times stand for its weights
        files = (
            sorted(p for p in (folder / component).rglob("*") if p.is_file()) if (folder / component).is_dir() else []
        )
        identity["source"] = str(folder.resolve())
        identity["files"] = [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return identity


def cache_key(host: PluginHost, config: Config, kind: str, component: str) -> dict[str, Any]:
    """What a cache entry of ``kind`` depends on: the format, the model (component), the settings
    that change an encoding and every plugin's ``cache_fingerprint``; its digest names the folder."""
    parts: dict[str, Any] = {"format": CACHE_FORMAT, "model": _model_identity(config, host, component)}
    if kind == "text":  # quantized text encoders encode differently; unset keeps existing caches valid
        from tuner.core.config.keys.model import text_encoder_precision_keys

        parts.update(
            {
                k: config[k]
                for k in text_encoder_precision_keys(config.keys)
                if config.get(k, NO_QUANTIZATION) != NO_QUANTIZATION
            }
        )
    for contribution in host.call("cache_fingerprint", config=config, kind=kind):
        if contribution:
            parts.update(contribution)
    return parts


def crop_offset(config: Config, path: Path, epoch: int = 0) -> float:
    """Where a random crop sits along the axis with a remainder: drawn per image and epoch from the
    run's seed (so a resumed run crops alike); 0.5 for centred crops."""
    if config.crop_style != "random":
        return 0.5
    return int(_digest([config.seed, image_key(path), epoch])[:8], 16) / 0xFFFFFFFF


def latent_key(
    config: Config,
    path: Path,
    bucket: Bucket,
    epoch: int = 0,
    mask: Path | None = None,
    reference: tuple[Path, tuple[int, int]] | None = None,
) -> str:
    offset = crop_offset(config, path, epoch)
    parts = [image_key(path), bucket.width, bucket.height, config.crop_style, offset]
    if mask is not None:  # cached with the latents: a changed mask is a new entry
        parts.append(image_key(mask))
    if reference is not None:  # an edit pair's reference latents (at their size) are cached with the target's
        parts += [image_key(reference[0]), *reference[1]]
    if config.image_background != "white":  # transparent images look different on it
        parts.append(config.image_background)
    return _digest(parts)[:32]


def crop_epochs(config: Config, plan: BucketPlan, global_batch: int, batch_count: int) -> int:
    """How many epochs ``batch_count`` global batches span: the random crops to cache per image
    (one set of latents otherwise)."""
    if config.crop_style != "random":
        return 1
    repeats = 1 + config.dataset_repeats
    per_epoch = sum(-(-count * repeats // global_batch) for count in plan.counts().values())
    return max(1, -(-batch_count // max(per_epoch, 1)))


@dataclass
class Entry:
    """One training image: its cached latents and caption, and the bucket it trains in."""

    latent: str
    text: str
    bucket: Bucket
    others: tuple[str, ...] = ()  # the text keys of the image's other captions
    masked: bool = False  # its cached latents come with a loss mask
    dataset: int = 0  # which of the run's datasets it belongs to
    variants: tuple[str, ...] = ()  # with random crops: the latents of each epoch's crop
    image: Path | None = None  # the image file
    reference: tuple[int, int] | None = None  # an edit pair's reference size (batches share it)
    dropped: str | None = None  # an edit pair's text key of a dropped caption (encoded with its reference)


@dataclass
class PreparedData:
    latents: TensorCache
    text: TensorCache
    entries: list[Entry]
    skipped: int
    plan: BucketPlan
    table: str = ""  # the bucket table to print (every dataset's, for several)

    def __post_init__(self) -> None:
        self.table = self.table or self.plan.table()


def measure(
    items: list[Item], config: Config, warn: Callable[[str], None], unreadable: list[str]
) -> tuple[list[Item], list[tuple[int, int]]]:
    """Each image's size from its header; unreadable ones are added to ``unreadable``, ones below
    ``minimum_image_size`` skipped with a warning and a count."""
    kept, sizes, small = [], [], []
    minimum, by_area = config.minimum_image_size, config.resolution_type == "area"
    for item in items:
        try:
            width, height = image_size(item.image)
        except unreadable_errors() as exc:
            unreadable.append(f"{item.image.name} ({type(exc).__name__})")
            continue
        if minimum and ((width * height) ** 0.5 if by_area else min(width, height)) < minimum:
            small.append(f"{item.image.name} ({width}x{height})")
            continue
        kept.append(item)
        sizes.append((width, height))
    if small:
        what = "sqrt(width x height)" if by_area else "shorter side"
        warn(
            f"skipped {len(small)} image(s) whose {what} is below minimum_image_size {minimum}: "
            + ", ".join(small[:5])
            + (" ..." if len(small) > 5 else "")
        )
    return kept, sizes


def assign_buckets(
    items: list[Item], config: Config, global_batch: int, warn: Callable[[str], None], unreadable: list[str]
) -> tuple[list[Item], BucketPlan]:
    """The images that train and the bucket of each (``tuner buckets`` prints the same plan)."""
    kept, sizes = measure(items, config, warn, unreadable)
    buckets = bucket_sizes(
        config.resolution, config.resolution_type, config.aspect_bucket_alignment, config.aspect_bucket_max_ratio
    )
    return kept, plan(sizes, buckets, global_batch)


def bucket_tables(config: Config, global_batch: int, warn: Callable[[str], None]) -> list[str]:
    """What ``tuner buckets`` prints, read from image headers only: each dataset's bucket table
    (named when there are several); unreadable images and skipped small ones go to ``warn``."""
    from tuner.core.config.datasets import resolve
    from tuner.core.data.images import caption_rule, scan_dataset

    datasets = resolve(config)
    tables = []
    for dataset in datasets:
        items = scan_dataset(dataset.config.data_dir, warn, caption_rule(dataset.config), dataset.config.mask_dir)
        unreadable: list[str] = []
        _, bucket_plan = assign_buckets(items, dataset.config, global_batch, warn, unreadable)
        if unreadable:
            warn(f"skipped {len(unreadable)} unreadable image(s): {', '.join(unreadable[:5])}")
        tables.append((f"{dataset.label}: " if len(datasets) > 1 else "") + bucket_plan.table())
    return tables


def prepare_caches(
    host: PluginHost,
    config: Config,
    items: list[Item],
    extra_texts: list[str],
    device: Any,
    dtype: torch.dtype,
    warn: Callable[[str], None],
    global_batch: int = 1,
    batch_count: int = 1,
    extra_reference: Path | None = None,
    dropped_text: str | None = None,
) -> PreparedData:
    """Make sure every image has cached latents at its bucket's size (with random crops, one crop
    per epoch that ``batch_count`` global batches reach) and every caption/prompt a cached encoding
    (``extra_texts`` with ``extra_reference``, validation's edit reference, when given; with
    ``dropped_text``, what a dropped caption trains with, each edit pair's own encoding of it).
    Encoders are loaded only for what is missing and are freed afterwards.
    """
    import torch

    from tuner.core.data.pairs import open_reference, reference_pixels
    from tuner.core.model.encoders import load_text_encoders, load_vae

    root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    latents = TensorCache(root, "latents", cache_key(host, config, "latents", "vae"))
    text = TensorCache(root, "text", cache_key(host, config, "text", "text_encoder"))

    unreadable: list[str] = []
    resized: list[str] = []  # masks of another size than their image (said once)
    transparent: set[str] = set()  # images composited on image_background (said once)
    sizes = pair_sizes(host, config, items, extra_reference, unreadable)  # edit pairs' references
    items = [i for i in items if i.reference is None or i.reference in sizes]

    def keyed(i: Item, b: Bucket, e: int) -> str:
        reference = (i.reference, sizes[i.reference]["vae"]) if i.reference is not None else None
        return latent_key(config, i.image, b, e, i.mask, reference)

    usable, bucket_plan = assign_buckets(items, config, global_batch, warn, unreadable)
    vae = None
    while True:  # an image that fails to decode is dropped and the buckets planned again
        epochs = crop_epochs(config, bucket_plan, global_batch, batch_count)
        wanted = [
            (i, b, e, keyed(i, b, e)) for i, b in zip(usable, bucket_plan.buckets, strict=True) for e in range(epochs)
        ]
        missing = [(i, b, e, k) for i, b, e, k in wanted if not latents.has(k)]
        if not missing:
            break
        sources = {k: i.image for i, _, _, k in missing}  # what each entry encodes, for messages
        vae = vae or load_vae(host, config, device, dtype)
        failed = []
        missing.sort(key=lambda m: (m[1].aspect, m[1].width))  # one bucket (one pixel size) per VAE batch
        with torch.no_grad():
            for bucket in dict.fromkeys(b for _, b, _, _ in missing):
                group = [m for m in missing if m[1] == bucket]
                for start in range(0, len(group), VAE_BATCH):
                    chunk, pixels, masks, references = [], [], [], []
                    for item, _, epoch, key in group[start : start + VAE_BATCH]:
                        if item in failed:
                            continue
                        try:
                            offset = crop_offset(config, item.image, epoch)
                            pixels.append(
                                load_image(
                                    item.image,
                                    bucket,
                                    config.crop_style,
                                    offset,
                                    config.image_background,
                                    lambda item=item: transparent.add(item.image.name),
                                )
                            )
                            if item.mask is not None:  # the same turn, scale and crop as its image
                                masks.append(
                                    load_mask(item.mask, item.image, bucket, config.crop_style, offset, resized)
                                )
                            else:
                                masks.append(None)
                            references.append(
                                reference_pixels(item.reference, sizes[item.reference]["vae"])
                                if item.reference is not None
                                else None
                            )
                            chunk.append(key)
                        except unreadable_errors() as exc:
                            failed.append(item)
                            unreadable.append(f"{item.image.name} ({type(exc).__name__})")
                    if chunk:
                        encoded = host.provide(
                            "encode_images", vae=vae, pixels=torch.stack(pixels).to(device, dtype), config=config
                        )
                        for key, latent, mask, reference in zip(chunk, encoded, masks, references, strict=True):
                            tensors = {"latents": latent.float()}
                            if reference is not None:  # the edit's start, at the family's size for it
                                tensors["reference"] = host.provide(
                                    "encode_images", vae=vae, pixels=reference[None].to(device, dtype), config=config
                                )[0].float()
                            if mask is not None:  # on the latent grid: each latent pixel's share of white
                                grid = torch.nn.functional.interpolate(mask[None], size=latent.shape[-2:], mode="area")
                                tensors["mask"] = grid[0]
                            latents.save(key, tensors, source=f"image {sources[key]}")
        if not failed:
            break
        kept = [item for item in usable if item not in failed]
        usable, bucket_plan = assign_buckets(kept, config, global_batch, lambda m: None, [])
    if vae is not None:
        del vae
        gc.collect()
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable image(s): {', '.join(unreadable[:5])}")
    if resized:
        warn(f"{len(resized)} mask(s) differ in size from their image and were resized to it: {', '.join(resized[:3])}")
    if transparent:
        names = sorted(transparent)
        warn(
            f"{len(names)} image(s) with transparency composited on {config.image_background} (image_background): "
            + ", ".join(names[:3])
            + (" ..." if len(names) > 3 else "")
        )
    if not usable:
        raise DataError(f"data_dir {config.data_dir}: none of the {len(items)} images could be used")

    # (text, reference): an edit pair's instruction is encoded with its reference image
    texts = list(
        dict.fromkeys(
            [(caption, item.reference) for item in usable for caption in item.captions]
            + [(dropped_text, i.reference) for i in usable if i.reference is not None and dropped_text is not None]
            + [(t, extra_reference) for t in extra_texts]
        )
    )
    missing_texts = [(t, r) for t, r in texts if not text.has(conditioning_key(t, r))]
    if missing_texts:
        encoders = load_text_encoders(host, config, device, dtype, warn)
        # captions in batches (plain and paired apart); prompts (validation) one at a time, as `tuner
        # sample` encodes them, so that a recipe reproduces the validation images bit for bit
        extras = {(t, extra_reference) for t in extra_texts}
        batches = []
        for paired in (False, True):
            captions = [m for m in missing_texts if m not in extras and (m[1] is not None) == paired]
            batches += [captions[i : i + TEXT_BATCH] for i in range(0, len(captions), TEXT_BATCH)]
        batches += [[m] for m in missing_texts if m in extras]
        with torch.no_grad():
            for batch in batches:
                references = None
                if batch[0][1] is not None:
                    references = [open_reference(r, sizes[r]["encoder"]) for _, r in batch]
                encoded = host.provide(
                    "encode_prompts",
                    text_encoders=encoders,
                    prompts=[t for t, _ in batch],
                    config=config,
                    device=device,
                    references=references,
                )
                for row, (t, r) in enumerate(batch):
                    text.save(
                        conditioning_key(t, r),
                        text_row(encoded, row, host.family.text_lengths_vary),
                        source=f"caption {t!r}"[:120],
                    )
        del encoders
        gc.collect()

    for cache in (latents, text):
        if cache.removed_temporaries:
            count = len(cache.removed_temporaries)
            warn(f"removed {count} temporary file{'s' * (count != 1)} a killed run left in {cache.dir}")
        if cache.damaged:
            warn(
                f"rebuilt {len(cache.damaged)} damaged {cache.kind} cache entr{'y' if len(cache.damaged) == 1 else 'ies'} in {cache.dir}"
            )
    required = host.family.required_text_keys
    for t, r in texts:  # refuse entries written without what the family needs (e.g. masks)
        stored = text.tensor_names(conditioning_key(t, r))
        lacking = [name for name in required if name not in stored]
        if lacking:
            raise DataError(
                f"text cache entry {text.path(conditioning_key(t, r))} has no {', '.join(lacking)} "
                f"(written by an older tuner or another tool); delete {text.dir} to rebuild the text cache"
            )
    epochs = crop_epochs(config, bucket_plan, global_batch, batch_count)
    entries = [
        Entry(
            keyed(i, b, 0),
            conditioning_key(i.caption, i.reference),
            b,
            tuple(conditioning_key(c, i.reference) for c in i.others),
            i.mask is not None,
            variants=tuple(keyed(i, b, e) for e in range(epochs)) if epochs > 1 else (),
            image=i.image,
            reference=sizes[i.reference]["vae"] if i.reference is not None else None,
            dropped=conditioning_key(dropped_text, i.reference)
            if i.reference is not None and dropped_text is not None
            else None,
        )
        for i, b in zip(usable, bucket_plan.buckets, strict=True)
    ]
    return PreparedData(latents, text, entries, len(unreadable), bucket_plan)


@dataclass(frozen=True)
class PairBucket:
    """The batch group of edit pairs: the targets' bucket and the references' size."""

    bucket: Bucket
    reference: tuple[int, int]

    @property
    def aspect(self) -> float:
        return self.bucket.aspect

    @property
    def width(self) -> int:
        return self.bucket.width


def pair_sizes(
    host: PluginHost, config: Config, items: list[Item], extra: Path | None, unreadable: list[str]
) -> dict[Path, dict[str, tuple[int, int]]]:
    """The family's VAE and encoder sizes of every reference image (and of validation's); an
    unreadable reference leaves its pair out, named."""
    from tuner.core.data.pairs import reference_sizes

    sizes = {}
    for reference in dict.fromkeys([i.reference for i in items if i.reference is not None] + [extra] * bool(extra)):
        try:
            sizes[reference] = reference_sizes(host, config, reference)
        except unreadable_errors() as exc:
            unreadable.append(f"{reference.name} ({type(exc).__name__})")
    return sizes


class CachedDataset:
    """torch-style dataset over cached entries: ``{"latents", "text", "size", "dataset"}`` per
    item, ``size`` being the bucket's ``(height, width)`` in pixels. Indices past the end name the
    same items in later epochs (their own random crops)."""

    def __init__(self, prepared: PreparedData, seed: int = 0):
        self.prepared, self.seed = prepared, seed

    def __len__(self) -> int:
        return len(self.prepared.entries)

    def buckets(self) -> list[Any]:
        """Each entry's batch group: its bucket, and an edit pair's reference size (batches stack them)."""
        return [
            entry.bucket if entry.reference is None else PairBucket(entry.bucket, entry.reference)
            for entry in self.prepared.entries
        ]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index % len(self)``; ``index // len(self)`` is its epoch (which random crop)."""
        epoch, position = divmod(index, len(self.prepared.entries))
        entry = self.prepared.entries[position]
        key = entry.variants[epoch % len(entry.variants)] if entry.variants else entry.latent
        text = entry.text
        if entry.others:  # several captions: one drawn from (seed, sample index), whichever process asks
            texts = (entry.text, *entry.others)
            text = texts[step_seed(self.seed, index, CAPTION_DRAW) % len(texts)]
        cached = self.prepared.latents.load(key)
        conditioning = self.prepared.text.load(text)
        if "reference" in cached:  # the edit's start reaches predict_flow with the text
            conditioning["reference_latents"] = cached["reference"]
        return {
            "dropped_text": self.prepared.text.load(entry.dropped) if entry.dropped else None,
            "latents": cached["latents"],
            "mask": cached["mask"] if entry.masked else None,
            "text": conditioning,
            "size": (entry.bucket.height, entry.bucket.width),
            "dataset": entry.dataset,
        }


def text_row(encoded: dict[str, torch.Tensor], row: int, cut: bool) -> dict[str, torch.Tensor]:
    """Row ``row`` of a batch of encodings; with ``cut`` (``FamilyInfo.text_lengths_vary``) only its
    tokens: every tensor as long as ``attention_mask`` is cut to the mask's count, so what is cached
    does not depend on the other prompts of its encoding batch."""
    values = {name: value[row] for name, value in encoded.items()}
    if cut and "attention_mask" in values:
        mask = values["attention_mask"]
        tokens, length = int(mask.sum()), mask.shape[0]
        values = {name: v[:tokens] if v.dim() and v.shape[0] == length else v for name, v in values.items()}
    return values


def pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack; tensors that differ in their first dimension (text of varying length) are right-padded
    with zeros to the longest first."""
    import torch

    longest = max(t.shape[0] for t in tensors) if tensors[0].dim() else 0
    if any(t.dim() and t.shape[0] != longest for t in tensors):
        tensors = [torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])]) for t in tensors]
    return torch.stack(tensors)


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    masks = [r.get("mask") for r in rows]
    if any(m is not None for m in masks):  # images without a mask weigh every latent pixel fully
        shape = next(m for m in masks if m is not None).shape
        masks = [m if m is not None else torch.ones(shape) for m in masks]
    dropped = [r.get("dropped_text") for r in rows]  # an edit pair's own dropped-caption encoding
    return {
        "dropped_text": {n: pad_stack([d[n] for d in dropped]) for n in dropped[0]} if dropped[0] else None,
        "mask": torch.stack(masks) if masks[0] is not None else None,
        "latents": torch.stack([r["latents"] for r in rows]),  # one bucket per batch: one shape
        "text": {name: pad_stack([r["text"][name] for r in rows]) for name in rows[0]["text"]},
        "size": rows[0]["size"],
        "dataset": rows[0]["dataset"],  # one dataset per batch too
    }
