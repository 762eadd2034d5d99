"""What a run says about itself in its ``output_dir``, for whoever watches it (``tuner server``, a
script, a person): ``run.json`` (status, process, family, precision, total steps) and
``config.yaml`` (the settings it was started with, paths resolved, so it resumes from anywhere).

``run.json`` is rewritten atomically at each change of status: ``starting`` (caching, loading),
``training``, then ``finished``, ``stopped`` (Ctrl-C or SIGTERM: a checkpoint was saved),
``interrupted`` (a second Ctrl-C) or ``failed`` (with the one-line error). A resume keeps
``started`` and adds the earlier launches' time to ``earlier_s``. A run killed with
``kill -9`` stays ``starting``/``training`` with a process that no longer exists: readers check
``pid`` (see :func:`process_alive`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from tuner.core.io import atomic_write, process_started, resolved_if_local

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
FORMAT = 1
# per-launch keys: never part of the snapshot a resume starts from
LAUNCH_KEYS = ("resume_from_checkpoint",)


TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def _now() -> str:
    return time.strftime(TIME_FORMAT)


def _seconds(record: dict[str, Any], alive: bool = False) -> float:
    """How long a launch of the run lasted (``launched`` to its last update, or to now while alive)."""
    try:
        began = time.mktime(time.strptime(record.get("launched") or record["started"], TIME_FORMAT))
        ended = time.time() if alive else time.mktime(time.strptime(record["updated"], TIME_FORMAT))
    except (KeyError, TypeError, ValueError):
        return 0.0
    return max(0.0, ended - began)


def duration(record: dict[str, Any], alive: bool) -> float | None:
    """The run's time so far over all its launches (a resume adds to it)."""
    if not isinstance(record.get("started"), str):
        return None
    return float(record.get("earlier_s") or 0) + _seconds(record, alive)


def settings_snapshot(config: Any) -> dict[str, Any]:
    """The keys the user set, with local paths made absolute (a resume may start elsewhere)."""
    snapshot: dict[str, Any] = {}
    for name, value in sorted(config.to_dict().items()):
        if name in LAUNCH_KEYS or not config.is_set(name):
            continue
        if value is not None and config.kind(name) == "path":
            value = str(Path(value).resolve())
        elif name == "pretrained_model_name_or_path":
            value = resolved_if_local(value)  # a local folder; a hub id stays as it is
        if name == "datasets" and value:
            value = [{**entry, "data_dir": str(Path(entry["data_dir"]).resolve())} for entry in value]
        snapshot[name] = value
    return snapshot


class RunRecord:
    """Writes ``run.json`` (and once ``config.yaml``) for one run; the main process only."""

    def __init__(self, config: Any) -> None:
        self.folder = Path(config.output_dir)
        snapshot = settings_snapshot(config)
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "status": "starting",
            "pid": os.getpid(),
            "pid_started": process_started(os.getpid()),  # tells this process from a later one with its pid
            "host": socket.gethostname(),
            "started": _now(),
            "updated": _now(),
            "family": config.model_family,
            "flavour": config.model_flavour,
            "model": snapshot.get("pretrained_model_name_or_path"),
            "precision": config.base_model_precision,
            "mixed_precision": config.mixed_precision,
            "max_train_steps": config.max_train_steps,
            "resumed_step": None,
            "config": CONFIG_FILE,
            "source": str(Path(config.source).resolve()) if Path(config.source).is_file() else config.source,
            "error": None,
            "lora_files": [],
        }
        previous = read_run(self.folder) if config.resume_from_checkpoint else None
        if previous and isinstance(previous.get("started"), str):  # one run across its resumes
            self.data["started"] = previous["started"]
            self.data["earlier_s"] = float(previous.get("earlier_s") or 0) + _seconds(previous)
        self.data["launched"] = _now()
        self._write_config(config, snapshot)
        self.write()

    def _write_config(self, config: Any, snapshot: dict[str, Any]) -> None:
        import yaml

        path = self.folder / CONFIG_FILE
        if Path(config.source).resolve() == path.resolve():
            return  # the run reads this very file: keep the user's comments
        text = (
            "# The settings this run started with (paths resolved), written by tuner run.\n"
            f"# Continue it with: tuner run --config {path} --set resume_from_checkpoint=latest\n"
        ) + yaml.safe_dump(snapshot, sort_keys=False, allow_unicode=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def update(self, **fields: Any) -> None:
        self.data.update(fields, updated=_now())
        self.write()

    def write(self) -> None:
        text = json.dumps(self.data, indent=1)
        try:
            atomic_write(self.folder / RUN_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        except OSError:  # a status file must never end a run (the disk-full message comes from the run itself)
            pass


def read_run(folder: str | Path) -> dict[str, Any] | None:
    """``folder/run.json`` as a dict, or None when absent or damaged."""
    try:
        data = json.loads((Path(folder) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- one run per output folder ------------------------------------------------------------------

LOCK_FILE = ".tuner.lock"


class OutputLock:
    """``output_dir/.tuner.lock``, held (``flock``) while a run writes there: a second run on the
    same folder is refused with one line naming the holder, instead of interleaving checkpoints and
    log lines with it. Whoever holds it owns the folder, so it removes the hidden ``.*.tmp`` files
    a writer killed mid-write left there (``atomic_write``'s temporaries). The kernel releases the lock when its process ends however it ends, so a
    ``kill -9`` leaves no stale lock. (Where ``fcntl`` does not exist, there is no lock.)"""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.path = Path(config.output_dir) / LOCK_FILE
        self.handle: Any = None

    def __enter__(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            handle.close()
            raise self.config.error(
                "output_dir",
                f"{self.config.output_dir} is in use by another run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it, stop it "
                "(Ctrl-C or SIGTERM saves a checkpoint) or choose another output_dir",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}))
        handle.flush()
        self.handle = handle
        for stale in self.path.parent.glob(".*.tmp"):  # half-written files of a writer killed mid-write
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the lock
            self.handle = None


def existing_run(folder: str | Path) -> str | None:
    """What a previous run left in ``folder``, in words, or None when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    record = read_run(folder) or {}
    checkpoints = sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
    loras = sorted(p.name for p in folder.glob("*.safetensors"))
    trained = checkpoints or loras or (folder / "train_log.jsonl").exists() or record.get("step")
    if not (record or trained):
        return None
    if not trained and record.get("status") in ("failed", "interrupted"):
        return None  # it stopped before its first step (a bad config, missing data): nothing to keep
    parts = [f"a {record['status']} run" if record.get("status") else "a run"]
    if record.get("step") is not None:
        parts.append(f"at step {record['step']}")
    if checkpoints:
        parts.append(f"checkpoints up to {checkpoints[-1]}" if len(checkpoints) > 1 else checkpoints[0])
    if loras:
        parts.append(", ".join(loras))
    return ", ".join(parts)


def forget_untrained_run(folder: str | Path) -> None:
    """Remove what a run that stopped before its first step wrote into the output folder it
    created (its run.json, config.yaml and lock), and the folder when nothing else is in it."""
    folder = Path(folder)
    lock = folder / LOCK_FILE
    handle = None
    if lock.exists():  # another run that started there meanwhile holds it: its files stay
        try:
            import fcntl

            handle = open(lock, "a+", encoding="utf-8")  # noqa: SIM115 - held until the files are gone
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        except OSError:
            handle.close()
            return
    try:
        for name in (RUN_FILE, CONFIG_FILE, LOCK_FILE):
            (folder / name).unlink(missing_ok=True)
    finally:
        if handle is not None:
            handle.close()
    try:
        folder.rmdir()  # only when empty: a cache or a log someone put there stays
    except OSError:
        pass


def settle_output_dir(config: Any, log: Any, main: bool = True) -> Any:
    """Decide what a run does with an ``output_dir`` that holds an earlier run (``existing_output``):
    refuse (the default: say what is there), write to a new numbered folder beside it, or start
    over there. A resume (``resume_from_checkpoint``) continues the run that is there instead.
    Every process of a multi-process run reaches the same answer; only the ``main`` one removes
    files (under the folder's lock)."""
    folder = Path(config.output_dir)
    if config.resume_from_checkpoint:
        _check_steps_left(config)
        return config
    found = existing_run(folder)
    if found is None:
        return config
    policy = config.existing_output
    if policy == "refuse":
        raise config.error(
            "output_dir",
            f"{folder} already holds {found}; continue it with --set resume_from_checkpoint=latest, or set "
            "existing_output: new (a numbered folder beside it) or overwrite (start over there)",
        )
    if policy == "new":
        number = 2
        while existing_run(f"{folder}-{number}") is not None:
            number += 1
        log(f"{folder} holds {found}; this run writes to {folder}-{number} (existing_output: new)")
        return config.derive({"output_dir": f"{folder}-{number}"})
    import shutil

    if not main:
        return config
    source = Path(config.source).resolve()
    with OutputLock(config):  # a run alive there holds it: refused, naming it, before anything goes
        removed = [p for p in folder.iterdir() if _written_by_a_run(p) and p.resolve() != source]
        for path in removed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    log(f"{folder} held {found}; removed its {len(removed)} files and folders (existing_output: overwrite)")
    return config


def _check_steps_left(config: Any) -> None:
    """A resume from a checkpoint at or past ``max_train_steps`` has nothing to train: say so, before
    anything is loaded or rewritten (``run.json`` of the finished run stays as it is)."""
    import re

    wanted = config.resume_from_checkpoint
    if wanted == "latest":
        steps = [
            int(m.group(1))
            for p in Path(config.output_dir).glob("checkpoint-*")
            if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
        ]
        step = max(steps, default=None)
    else:
        match = re.fullmatch(r"checkpoint-(\d+)", Path(wanted).name)
        step = int(match.group(1)) if match else None
    if step is not None and step >= config.max_train_steps:
        raise config.error(
            "max_train_steps",
            f"the checkpoint to resume is at step {step} and max_train_steps is {config.max_train_steps}: nothing "
            f"to train; raise max_train_steps above {step} to train on",
        )


def _written_by_a_run(path: Path) -> bool:
    names = {RUN_FILE, CONFIG_FILE, "train_log.jsonl", "recipe.json", "README.md", "validation", "logs"}
    return (
        path.name in names
        or path.name.startswith(("checkpoint-", ".checkpoint-"))
        or (path.suffix == ".safetensors" and path.is_file())
    )
