"""Several datasets in one run: ``datasets:`` in the config, a list of entries such as

    datasets:
      - id: subject
        data_dir: data/me
        repeats: 4
      - id: style
        data_dir: data/paintings
        resolution: 768
        weight: 0.5
        caption_dropout_probability: 0.1
      - id: people
        data_dir: data/regularisation
        kind: regularisation

Each entry takes the run's settings and overrides those it names, so it has its own buckets,
captions, repeats and caption dropout. A single ``data_dir`` is the short form of one entry. Each
global batch comes from one dataset, drawn with probability ``weight / sum of weights`` from a hash
of (seed, batch number) (a pure function, so resume and several processes stay exact), and from
one of that dataset's buckets. ``kind: regularisation`` marks prior-preservation images, trained
with their own captions like any other. Import-cheap: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config

# an entry's field -> the run's config key it overrides
OVERRIDES = {
    "data_dir": "data_dir",
    "instance_data_dir": "data_dir",
    "resolution": "resolution",
    "resolution_type": "resolution_type",
    "repeats": "dataset_repeats",
    "caption_strategy": "caption_strategy",
    "instance_prompt": "instance_prompt",
    "caption_extensions": "caption_extensions",
    "caption_prefix": "caption_prefix",
    "caption_lines": "caption_lines",
    "caption_metadata": "caption_metadata",
    "regularisation_target": "regularisation_target",
    "mask_dir": "mask_dir",
    "conditioning_data_dir": "conditioning_data_dir",
    "masked_loss_floor": "masked_loss_floor",
    "caption_dropout_keeps_prefix": "caption_dropout_keeps_prefix",
    "caption_dropout_probability": "caption_dropout_probability",
    "crop_style": "crop_style",
    "aspect_bucket_max_ratio": "aspect_bucket_max_ratio",
    "aspect_bucket_alignment": "aspect_bucket_alignment",
    "minimum_image_size": "minimum_image_size",
}
OWN = ("id", "weight", "kind")
KINDS = ("training", "regularisation")


@dataclass
class Dataset:
    """One dataset of a run: its name, sampling weight, kind and the run's config as it sees it."""

    id: str
    config: Config
    weight: float = 1.0
    kind: str = "training"

    @property
    def label(self) -> str:
        return f"dataset {self.id!r}" + (" (regularisation)" if self.kind == "regularisation" else "")


def resolve(config: Config) -> list[Dataset]:
    """The run's datasets, each entry checked as the run's own keys are; a one-line error names the
    entry and the field. ``data_dir`` alone is one dataset."""
    from tuner.core.config.values import check_value

    entries = config.datasets
    if entries is None:
        return [Dataset("default", config)] if config.data_dir is not None else []
    if config.data_dir is not None:
        raise config.error("datasets", "set either data_dir or datasets, not both")
    if not entries:
        raise config.error("datasets", "is an empty list; give at least one entry with a data_dir")
    found, ids = [], set()
    for index, entry in enumerate(entries):
        name = entry.get("id", f"#{index + 1}") if isinstance(entry, dict) else f"#{index + 1}"
        where = f"{config.source}: datasets[{index}] ({name})"
        if not isinstance(entry, dict):
            raise config.error("datasets", f"entry {index} must be a mapping with a data_dir, got {entry!r}")
        unknown = sorted(set(entry) - set(OVERRIDES) - set(OWN))
        if unknown:
            raise _error(where, f"unknown field(s) {', '.join(unknown)}; use {', '.join(sorted({*OVERRIDES, *OWN}))}")
        if not any(k in entry for k in ("data_dir", "instance_data_dir")):
            raise _error(where, "data_dir is required")
        values = {}
        for field, key in OVERRIDES.items():
            if field in entry:
                values[key] = check_value(config.keys[key], entry[field], where)
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise _error(where, f"weight: {weight!r} is not a positive number")
        kind = entry.get("kind", "training")
        if kind not in KINDS:
            raise _error(where, f"kind: {kind!r} is not one of {', '.join(KINDS)}")
        if str(name) in ids:
            raise _error(where, f"id {name!r} is used by another entry")
        ids.add(str(name))
        values["datasets"] = None  # an entry is one dataset
        if kind != "regularisation":  # the run's regularisation_target is its regularisation entries'
            if values.get("regularisation_target", "noise") != "noise":
                raise _error(where, "regularisation_target: base_model is for kind: regularisation entries")
            values["regularisation_target"] = "noise"
        found.append(Dataset(str(name), config.derive(values, where), float(weight), kind))
    return found


def _error(where: str, message: str) -> Exception:
    from tuner.core.errors import ConfigError

    return ConfigError(f"{where}: {message}")


def choose(seed: int, batch: int, weights: list[float]) -> int:
    """Which dataset global batch ``batch`` comes from: a weighted draw from a hash of (seed, batch)
    (blake2b: uniform, and about a microsecond, so a resumed sampler replays the draws before it)."""
    import hashlib

    if len(weights) == 1:
        return 0
    digest = hashlib.blake2b(f"{seed}:{batch}:datasets".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "little") / 2**64 * sum(weights)
    for index, weight in enumerate(weights):
        point -= weight
        if point < 0:
            return index
    return len(weights) - 1


def describe(datasets: list[Dataset]) -> dict[str, Any]:
    """For logs and the bucket table."""
    total = sum(d.weight for d in datasets)
    return {d.id: {"kind": d.kind, "share": d.weight / total} for d in datasets}
