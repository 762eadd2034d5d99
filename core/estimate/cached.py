"""The memory estimate a run prints at start, remembered: tracing the real Chroma takes ~17 s on a
CPU, and a second start with the same settings should not pay it again.

An estimate depends on the settings that shape the model, the batch and the precision, the
model's config files, the device type, the plugins of the run and the versions of tuner, torch,
diffusers, transformers and peft. The key is a digest of all of them (keys that cannot change
memory, such as the learning rate or where outputs go, are left out); the estimate is stored as
JSON under ``cache_dir/estimates``. Free memory is read anew every time: only the estimate is kept.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.core.estimate.report import Estimate, Phase
from tuner.core.io import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config
    from tuner.core.host.manager import PluginHost

FORMAT = 1
# keys that decide nothing about memory (a key not listed counts: a miss costs time, never truth)
IRRELEVANT = {
    "output_dir",
    "cache_dir",
    "data_dir",
    "eval_data_dir",
    "resume_from_checkpoint",
    "existing_output",
    "seed",
    "validation_seed",
    "report_to",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "validation_steps",
    "max_train_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "adam_weight_decay",
    "max_grad_norm",
    "divergence_skip_limit",
    "divergence_max_rollbacks",
    "divergence_lr_factor",
    "memory_estimate",
    "caption_dropout_probability",
    "caption_strategy",
    "instance_prompt",
    "caption_extensions",
    "caption_lines",
    "caption_metadata",
    "caption_prefix",
    "caption_dropout_keeps_prefix",
    "sigma_sampling",
    "masked_loss_floor",
    "mask_dir",
    "sigma_sampling_mean",
    "sigma_sampling_std",
    "sigma_sampling_scale",
    "dataset_repeats",
    "crop_style",
    "image_background",
}


def _model_files(source: str) -> Any:
    """What the model's config files say (a local folder), or the hub id (its files are pinned by the
    revision in the settings)."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    return {
        str(path.relative_to(folder)): path.read_text(encoding="utf-8", errors="replace")
        for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*/config.json"))
    }


def _versions() -> dict[str, str]:
    import importlib.metadata

    found = {}
    for name in ("tuner", "torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    # the estimator and the training step it traces, so an edited checkout never reads a stale answer
    code = hashlib.sha256()
    core = Path(__file__).parents[1]
    for path in sorted(
        [
            *(core / "estimate").glob("*.py"),
            *(core / "training").glob("*.py"),
            core / "model" / "swap.py",
            core / "model" / "activations.py",
        ]
    ):
        code.update(path.read_bytes())
    found["estimate_code"] = code.hexdigest()[:16]
    return found


def estimate_key(host: PluginHost, config: Config, device_type: str) -> str:
    from tuner.core.config.values import model_source

    settings = {k: v for k, v in config.to_dict().items() if k not in IRRELEVANT}
    plugins = sorted(  # installed plugins (a family's implementation joins its record once loaded: not counted)
        (r.name, r.distribution, r.version) for r in host.records if r.module is not None and ":" not in r.name
    )
    parts = {
        "format": FORMAT,
        "settings": settings,
        "model": _model_files(model_source(config, host.family.flavours)),
        "device_type": device_type,
        "plugins": plugins,
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def from_dict(data: dict[str, Any]) -> Estimate:
    return Estimate(
        family=data["family"],
        source=data["source"],
        device_type=data["device_type"],
        precision=data["base_model_precision"],
        settings=data["settings"],
        phases=[Phase(**phase) for phase in data["phases"]],
        notes=list(data.get("notes", [])),
    )


def cached_estimate(host: PluginHost, config: Config, device_type: str, folder: Path) -> tuple[Estimate, bool]:
    """(the estimate, whether it came from ``folder``); computed and stored when not there."""
    import tuner.core.estimate as estimates

    path = Path(folder) / "estimates" / f"{estimate_key(host, config, device_type)}.json"
    try:
        return from_dict(json.loads(path.read_text(encoding="utf-8"))), True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: computed again
    found = estimates.estimate(host, config, device_type)
    remember_estimate(host, config, device_type, folder, found)
    return found, False


def remember_estimate(host: PluginHost, config: Config, device_type: str, folder: Path, found: Estimate) -> None:
    """Store ``found`` as the estimate of ``config`` (a memory plan's estimate is the run's own)."""
    path = Path(folder) / "estimates" / f"{estimate_key(host, config, device_type)}.json"
    text = json.dumps(found.to_dict(), indent=1)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError:  # a cache that cannot be written only costs time
        pass


def cached_plans(host: PluginHost, config: Config, device_type: str, folder: Path) -> list[Any]:
    """The memory plans of ``config`` (:func:`tuner.core.estimate.plan.memory_plans`), remembered
    like the estimate: ``memory_budget`` picks among them anew each start, so it is not in the key."""
    from tuner.core.estimate.plan import Plan, memory_plans

    unbudgeted = config.derive({"memory_budget": None})
    path = Path(folder) / "estimates" / f"plans-{estimate_key(host, unbudgeted, device_type)}.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [Plan(row["keys"], from_dict(row["estimate"]), row["relative_step_time"]) for row in rows]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: planned again
    plans = memory_plans(host, config, device_type)
    rows = [{**plan.to_dict(), "estimate": plan.estimate.to_dict()} for plan in plans]
    text = json.dumps(rows, indent=1)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError:  # a cache that cannot be written only costs time
        pass
    return plans
