"""Full-state checkpoints that are written atomically, verified on load, and never unpickled.

A checkpoint folder ``checkpoint-N`` holds:

* ``pytorch_lora_weights.safetensors``: the LoRA as of step N, usable on its own;
* ``adapter.safetensors``: the trainable parameters by their names in the model;
* ``optimizer.safetensors``: the optimizer's tensors (per-parameter state);
* ``rng.safetensors``: the torch CPU/CUDA generator states and numpy's key;
* ``state.json``: step, data position, optimizer param groups and scalar state, LR scheduler,
  python/numpy RNG scalars, the divergence guard's state and the settings a resume must match
  (the keys flagged ``resume_critical``, whoever offers them, and the adapted modules);
* ``manifest.json`` (written last): size and sha256 of every file.

Everything is written to a hidden ``.checkpoint-N.partial-*`` folder, each file fsynced, and the
folder renamed into place; a checkpoint whose manifest does not verify (a kill -9 during a save,
a truncated copy) is skipped on resume, never loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuner.core.errors import ConfigError, TunerError
from tuner.core.io import atomic_write, resolved_if_local, save_safetensors

MANIFEST = "manifest.json"
STATE = "state.json"
NAME = re.compile(r"^checkpoint-(\d+)$")


class DiskFullError(TunerError):
    """The disk filled up while writing; the message names the last good checkpoint."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1, sort_keys=True)))


# -- capturing and restoring state ----------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, scalars


def restore_rng(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = scalars["python"]
    random.setstate((version, tuple(internal), gauss))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict as safetensors tensors (``"<param index>.<key>"``, nested dicts
    such as bitsandbytes' quantization state as ``"<index>.<key>.<subkey>"``) and JSON (param
    groups, numbers)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}

    def flatten(prefix: str, entries: dict[str, Any]) -> None:
        for key, value in entries.items():
            name = f"{prefix}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            elif isinstance(value, dict):
                flatten(name, value)
            else:
                scalars[name] = value

    for index, entries in state["state"].items():
        flatten(str(index), entries)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *saved["scalars"].items()]:
        index, *path, name = key.split(".")
        entries = state.setdefault(int(index), {})
        for part in path:
            entries = entries.setdefault(part, {})
        entries[name] = value
    # JSON turned tuples (betas, Adafactor's eps) into lists; optimizers compare and unpack them as tuples
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in saved["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- writing, finding, loading ---------------------------------------------------------------------


def partial_folder(folder: Path, owner: str | int | None = None) -> Path:
    """Where ``folder`` is written before it is renamed into place (``owner``: this process's id,
    or a name all processes of a sharded save agree on)."""
    return folder.parent / f".{folder.name}.partial-{os.getpid() if owner is None else owner}"


def write_checkpoint(
    folder: Path,
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]],
    state: dict[str, Any],
    last_good: Callable[[], str],
    partial: Path | None = None,
) -> Path:
    """Write safetensors ``files`` and ``state`` to ``folder`` atomically (all or nothing).
    ``partial``: a folder already holding other parts (a sharded save's shards), finished here."""
    folder = Path(folder)
    fresh = partial is None
    partial = partial_folder(folder) if partial is None else partial
    try:
        if fresh:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        for name, (tensors, metadata) in files.items():
            save_safetensors(partial / name, tensors, metadata)
        _write_json(partial / STATE, state)
        written = sorted(p for p in partial.rglob("*") if p.is_file())
        manifest = {
            p.relative_to(partial).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in written
        }
        _write_json(partial / MANIFEST, manifest)
        if folder.exists():  # saving the same step again: move the old one aside first
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            os.replace(partial, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, folder)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise write_error(exc, folder, last_good) from None
    return folder


def write_error(exc: OSError, folder: Path, last_good: Callable[[], str]) -> TunerError:
    """The one-line error of a failed checkpoint write (a full disk names the last good one)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"disk full while writing {folder.name} in {folder.parent}; {last_good()} is intact; "
            "free some space and resume with resume_from_checkpoint: latest"
        )
    return TunerError(f"cannot write {folder}: {exc}")


def verify(folder: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the save was cut off)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "unreadable manifest"
    well_formed = isinstance(manifest, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in manifest.values()
    )
    if not well_formed:
        return "damaged manifest (not a mapping of file sizes and hashes)"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
            return f"{name} does not match its manifest"
    return None


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders in ``output_dir`` by step, oldest first (not verified)."""
    found = []
    if Path(output_dir).is_dir():
        for path in Path(output_dir).iterdir():
            match = NAME.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_valid(output_dir: Path, warn: Callable[[str], None]) -> Path | None:
    for _, path in reversed(checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"skipping {path}: {problem}")
    return None


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    problem = verify(folder)
    if problem is not None:
        raise TunerError(f"checkpoint {folder} is damaged: {problem}; pick another or delete it")
    state = json.loads((folder / STATE).read_text())
    tensors = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
    return state, tensors


def prune(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (and leftovers of cut-off saves)."""
    removed = []
    for path in Path(output_dir).glob(".checkpoint-*.partial-*"):
        shutil.rmtree(path, ignore_errors=True)
    if keep > 0:
        for _, path in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def resume_settings(config: Any, targets: list[str]) -> dict[str, Any]:
    """What defines the adapter: every key flagged ``resume_critical`` and the adapted modules. Only
    keys that name files are resolved (path keys, and the model when it is a local folder): a value
    like ``lora`` or ``base`` stays a value even where a folder of that name lies."""

    def recorded(key: str, value: Any) -> Any:
        return resolved_if_local(value) if config.kind(key) == "path" or key == MODEL_KEY else value

    return {**{k: recorded(k, v) for k, v in config.flagged("resume_critical").items()}, "targets": targets}


MODEL_KEY = "pretrained_model_name_or_path"  # a hub id or a local folder: resolved only when local


def check_resume_settings(saved: dict[str, Any], config: Any, targets: list[str], folder: Path) -> None:
    now = resume_settings(config, targets)
    # a key added after the checkpoint was written was at its default then
    declared = config.keys
    defaults = {key: declared[key].default for key in now if key in declared}
    names_a_file = {key for key in now if key in declared and (config.kind(key) == "path" or key == MODEL_KEY)}

    def same(key: str) -> bool:
        before = saved.get(key, defaults.get(key))
        return before == now[key] or (key in names_a_file and resolved_if_local(before) == now[key])

    differing = [key for key in now if not same(key)]
    if differing:
        detail = ", ".join(
            f"{key} ({saved.get(key)!r} -> {now[key]!r})" if key != "targets" else "LoRA targets" for key in differing
        )
        raise ConfigError(
            f"{config.source}: resume_from_checkpoint: {folder.name} was trained with different {detail}; "
            "use the same settings or a new output_dir"
        )
