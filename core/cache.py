"""On-disk caches of VAE latents and text encodings, reused when the model and settings match.

Layout: ``<cache_dir>/<kind>/<fingerprint>/<entry>.safetensors`` with ``fingerprint.json`` beside
the entries. The fingerprint hashes the model identity and every setting that changes what an
entry holds (core ones plus each plugin's ``cache_fingerprint``). Latent entries are keyed by the
image's path, size and modification time; text entries by the text itself. Encoders are loaded
only when an entry is missing and are released before training starts.
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

from tuner.core.config import NO_QUANTIZATION, model_source
from tuner.core.data import Item, load_image
from tuner.core.errors import DataError
from tuner.core.io import atomic_write, save_safetensors

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tuner.core.config import Config
    from tuner.core.plugins import PluginHost

CACHE_FORMAT = 1
VAE_BATCH = 4
TEXT_BATCH = 8


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tuner"


class TensorCache:
    """One folder of safetensors entries sharing a fingerprint."""

    def __init__(self, root: Path, kind: str, fingerprint: dict[str, Any]):
        self.kind = kind
        self.dir = root / kind / _digest(fingerprint)[:20]
        self.dir.mkdir(parents=True, exist_ok=True)
        marker = self.dir / "fingerprint.json"
        if not marker.exists():
            atomic_write(marker, lambda tmp: Path(tmp).write_text(json.dumps(fingerprint, indent=1, default=str)))

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path(key)))
        except Exception as exc:
            raise DataError(
                f"{self.kind} cache entry {self.path(key)} is unreadable ({exc}); delete {self.dir} to rebuild it"
            ) from None

    def tensor_names(self, key: str) -> set[str]:
        """Names stored in an entry, read from the file header only."""
        from safetensors import safe_open

        with safe_open(str(self.path(key)), framework="pt") as handle:
            return set(handle.keys())

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        save_safetensors(self.path(key), tensors)


def image_key(path: Path) -> str:
    stat = path.stat()
    return _digest([str(path.resolve()), stat.st_size, stat.st_mtime_ns])[:32]


def text_key(text: str) -> str:
    return _digest(text)[:32]


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


def _fingerprint(host: PluginHost, config: Config, kind: str, component: str) -> dict[str, Any]:
    parts: dict[str, Any] = {"format": CACHE_FORMAT, "model": _model_identity(config, host, component)}
    if kind == "latents":
        parts["resolution"] = config.resolution
    else:  # quantized text encoders encode differently; unset keeps existing caches valid
        from tuner.core.builtin import TEXT_ENCODER_PRECISIONS

        parts.update(
            {k: config[k] for k in TEXT_ENCODER_PRECISIONS if config.get(k, NO_QUANTIZATION) != NO_QUANTIZATION}
        )
    for contribution in host.hook.cache_fingerprint(config=config, kind=kind):
        if contribution:
            parts.update(contribution)
    return parts


@dataclass
class PreparedData:
    latents: TensorCache
    text: TensorCache
    entries: list[tuple[str, str]]  # (latent key, text key) of each usable training image
    skipped: int


def prepare_caches(
    host: PluginHost,
    config: Config,
    items: list[Item],
    extra_texts: list[str],
    device: Any,
    dtype: torch.dtype,
    warn: Callable[[str], None],
) -> PreparedData:
    """Make sure every image has cached latents and every caption/prompt a cached encoding.

    Encoders are loaded only for what is missing and are freed afterwards.
    """
    import torch

    from tuner.core.encoders import load_text_encoders, load_vae

    root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    latents = TensorCache(root, "latents", _fingerprint(host, config, "latents", "vae"))
    text = TensorCache(root, "text", _fingerprint(host, config, "text", "text_encoder"))

    missing_images = [item for item in items if not latents.has(image_key(item.image))]
    unreadable: list[str] = []
    if missing_images:
        vae = load_vae(host, config, device, dtype)
        with torch.no_grad():
            for start in range(0, len(missing_images), VAE_BATCH):
                chunk, pixels = [], []
                for item in missing_images[start : start + VAE_BATCH]:
                    try:
                        pixels.append(load_image(item.image, config.resolution))
                        chunk.append(item)
                    except (OSError, ValueError, SyntaxError) as exc:
                        unreadable.append(f"{item.image.name} ({type(exc).__name__})")
                if not chunk:
                    continue
                encoded = host.provide(
                    "encode_images", vae=vae, pixels=torch.stack(pixels).to(device, dtype), config=config
                )
                for item, latent in zip(chunk, encoded, strict=True):
                    latents.save(image_key(item.image), {"latents": latent.float()})
        del vae
        gc.collect()
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable image(s): {', '.join(unreadable[:5])}")

    usable = [item for item in items if latents.has(image_key(item.image))]
    if not usable:
        raise DataError(f"data_dir {config.data_dir}: none of the {len(items)} images could be read")

    texts = list(dict.fromkeys([item.caption for item in usable] + extra_texts))
    missing_texts = [t for t in texts if not text.has(text_key(t))]
    if missing_texts:
        encoders = load_text_encoders(host, config, device, dtype, warn)
        # captions in batches; prompts (validation) one at a time, as `tuner sample` encodes them,
        # so that a recipe reproduces the validation images bit for bit
        captions = [t for t in missing_texts if t not in extra_texts]
        batches = [captions[i : i + TEXT_BATCH] for i in range(0, len(captions), TEXT_BATCH)]
        batches += [[t] for t in missing_texts if t in extra_texts]
        with torch.no_grad():
            for batch in batches:
                encoded = host.provide(
                    "encode_prompts", text_encoders=encoders, prompts=batch, config=config, device=device
                )
                for row, t in enumerate(batch):
                    text.save(text_key(t), {name: value[row] for name, value in encoded.items()})
        del encoders
        gc.collect()

    required = host.family.required_text_keys
    for t in texts:  # refuse entries written without what the family needs (e.g. masks)
        stored = text.tensor_names(text_key(t))
        lacking = [name for name in required if name not in stored]
        if lacking:
            raise DataError(
                f"text cache entry {text.path(text_key(t))} has no {', '.join(lacking)} "
                f"(written by an older tuner or another tool); delete {text.dir} to rebuild the text cache"
            )
    return PreparedData(latents, text, [(image_key(i.image), text_key(i.caption)) for i in usable], len(unreadable))


class CachedDataset:
    """torch-style dataset over cached entries: ``{"latents": ..., "text": {...}}`` per item."""

    def __init__(self, prepared: PreparedData):
        self.prepared = prepared

    def __len__(self) -> int:
        return len(self.prepared.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        latent_key, caption_key = self.prepared.entries[index]
        return {
            "latents": self.prepared.latents.load(latent_key)["latents"],
            "text": self.prepared.text.load(caption_key),
        }


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {
        "latents": torch.stack([r["latents"] for r in rows]),
        "text": {name: torch.stack([r["text"][name] for r in rows]) for name in rows[0]["text"]},
    }
