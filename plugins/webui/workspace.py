"""The server's view of its workspace: paths that never leave it, the runs in it (read from their
output folders, so runs started from a terminal appear and the list survives a restart), and
dataset folders as the data picker shows them."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.core.api import RUN_FILE, duration, process_alive, read_run

SKIPPED_FOLDERS = {"cache", "validation", "samples", "logs", "node_modules", "__pycache__", "site-packages"}
MAX_DEPTH = 4
LIVE = ("starting", "training")
SIGMA_BINS = 20


class OutsideWorkspace(Exception):
    """A path that resolves outside the workspace (``..``, an absolute path, a symlink out)."""


class Workspace:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.logs = LogCache()
        self._runs: tuple[float, list[Path]] = (0.0, [])

    def resolve(self, relative: str | os.PathLike[str], must_exist: bool = True) -> Path:
        """``relative`` inside the workspace, symlinks resolved; anything else raises OutsideWorkspace."""
        text = os.fspath(relative)
        if "\x00" in text:
            raise OutsideWorkspace(text)
        path = (self.root / text).resolve()  # an absolute ``text`` replaces the root, then fails below
        if path != self.root and not path.is_relative_to(self.root):
            raise OutsideWorkspace(text)
        if must_exist and not path.exists():
            raise FileNotFoundError(text)
        return path

    def relative(self, path: str | Path) -> str:
        resolved = Path(path).resolve()
        return "." if resolved == self.root else resolved.relative_to(self.root).as_posix()

    # -- runs -----------------------------------------------------------------------------------

    def run_folders(self) -> list[Path]:
        """Folders under the workspace holding a ``run.json`` (searched a few levels deep)."""
        found_at, cached = self._runs
        if time.monotonic() - found_at < 2.0:
            return cached
        found: list[Path] = []
        for folder, subfolders, files in os.walk(self.root):
            depth = len(Path(folder).relative_to(self.root).parts)
            if RUN_FILE in files:
                found.append(Path(folder))
            subfolders[:] = [
                d
                for d in subfolders
                if depth < MAX_DEPTH
                and not d.startswith(".")
                and d not in SKIPPED_FOLDERS
                and not d.startswith("checkpoint-")
            ]
        self._runs = (time.monotonic(), found)
        return found

    def run_summary(self, folder: Path) -> dict[str, Any] | None:
        record = read_run(folder)
        if record is None:
            if not (folder / RUN_FILE).is_file():
                return None
            # there, but not a run's record (truncated by a full disk, edited): shown with its problem
            record = {"status": "damaged", "error": f"{RUN_FILE} cannot be read (truncated or edited by hand)"}
        if not isinstance(record.get("status", ""), str):
            record = {**record, "status": "damaged", "error": f"{RUN_FILE} holds a status that is not text"}
        log = self.logs.read(folder / "train_log.jsonl")
        status = record.get("status", "unknown")
        alive = status in LIVE and process_alive(record.get("pid"), record.get("host"), record.get("pid_started"))
        if status in LIVE and not alive:
            status = "died"  # killed (kill -9, a crash of the machine): resume from its last checkpoint
        last = log.last_step
        return {
            "path": self.relative(folder),
            "name": folder.name,
            "family": record.get("family"),
            "flavour": record.get("flavour"),
            "precision": record.get("precision"),
            "status": status,
            "alive": alive,
            "pid": record.get("pid") if alive else None,
            "step": last.get("step", 0) if last else 0,
            "total": record.get("max_train_steps"),
            "loss": last.get("loss") if last else None,
            "eval_loss": log.eval_loss,
            "started": record.get("started"),
            "updated": record.get("updated"),
            "duration_s": duration(record, alive),
            "reason": record.get("error"),  # why it stopped or failed, in one line
        }

    def runs(self) -> list[dict[str, Any]]:
        rows = [row for folder in self.run_folders() if (row := self.run_summary(folder)) is not None]
        return sorted(rows, key=lambda row: row["started"] or "", reverse=True)

    def run_detail(self, folder: Path, since: int, console: Path | None = None) -> dict[str, Any]:
        """What the run page shows; ``console``: the log of the folder's last job (the web UI keeps
        it in its state folder), else ``console.log`` in the folder."""
        console = console or folder / "console.log"
        summary = self.run_summary(folder) or self._not_started(folder, console)
        log = self.logs.read(folder / "train_log.jsonl")
        reset = since > len(log.records)  # the log was cut back (a resume drops what followed its checkpoint)
        start = 0 if reset else since
        rate = log.steps_per_second()
        total, step = summary.get("total"), summary.get("step") or 0
        validations = sorted(p for p in (folder / "validation").glob("step_*") if p.is_dir())
        samples = sorted((p for p in (folder / "samples").glob("*") if p.is_dir()), reverse=True)
        return {
            **summary,
            "records": log.records[start:],
            "next": len(log.records),
            "reset": reset,
            "steps_per_s": rate,
            "eta_s": (total - step) / rate if rate and total and summary.get("alive") else None,
            "sigma_histogram": log.sigma_counts,
            "validations": [
                {
                    "step": int(p.name.removeprefix("step_")),
                    "grid": self.relative(p / "grid.png") if (p / "grid.png").exists() else None,
                    "images": [self.relative(i) for i in sorted(p.glob("*.png")) if i.name != "grid.png"],
                }
                for p in validations
            ],
            "checkpoints": [p.name for p in sorted(folder.glob("checkpoint-*"), key=_checkpoint_step)],
            "files": [
                {"name": p.name, "path": self.relative(p), "bytes": p.stat().st_size}
                for p in sorted(folder.glob("*.safetensors")) + [folder / "recipe.json", folder / "config.yaml"]
                if p.is_file()
            ],
            "samples": [
                {
                    "name": p.name,
                    "images": [self.relative(i) for i in sorted(p.glob("*.png"))],
                    "last_line": last_line(p / "sample.log"),  # what went wrong when there are no images
                }
                for p in samples
            ],
            "log_tail": console_tail(console),
        }

    def _not_started(self, folder: Path, console: Path) -> dict[str, Any]:
        """A folder without ``run.json``: a job not started yet, or one the CLI refused before the run
        began (a config error): then its console's last line says why."""
        reason = last_line(console)
        status = "failed" if reason and not reason.startswith("$ tuner") else "none"
        return {"path": self.relative(folder), "name": folder.name, "status": status, "reason": reason}


def last_line(path: Path) -> str:
    lines = [line for line in console_tail(path, lines=20).splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def console_tail(path: Path, lines: int = 60, max_bytes: int = 64_000) -> str:
    """The end of a run's console output, progress-bar redraws (``\\r``) collapsed to their last state."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            raw = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in raw.split("\n")]
    return "\n".join(shown[-lines:])


# -- the training log -------------------------------------------------------------------------------


@dataclass
class ParsedLog:
    records: list[dict[str, Any]] = field(default_factory=list)  # steps, skips, rollbacks, evaluations
    sigma_counts: list[int] = field(default_factory=lambda: [0] * SIGMA_BINS)
    eval_loss: float | None = None
    last_step: dict[str, Any] | None = None
    offset: int = 0  # bytes parsed (up to the last complete line)
    identity: tuple[int, int] = (0, 0)  # (device, inode): a rewritten log starts over

    def add(self, row: dict[str, Any]) -> None:
        kept = {
            k: row[k]
            for k in ("step", "loss", "lr", "grad_norm", "sigma", "eval_loss", "event", "elapsed_s")
            if k in row
        }
        self.records.append(kept)
        if row.get("event") == "evaluation":
            self.eval_loss = row.get("eval_loss")
        elif "event" not in row:
            self.last_step = kept
            for sigma in row.get("sigmas", ()):
                self.sigma_counts[min(SIGMA_BINS - 1, max(0, int(sigma * SIGMA_BINS)))] += 1

    def steps_per_second(self, window: int = 20) -> float | None:
        steps = [r for r in self.records if "event" not in r and "elapsed_s" in r][-window:]
        if len(steps) < 2 or steps[-1]["elapsed_s"] <= steps[0]["elapsed_s"]:
            return None
        return (steps[-1]["step"] - steps[0]["step"]) / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])


class LogCache:
    """Parses each ``train_log.jsonl`` once and then only what was appended, so many clients polling
    a run cost the training process nothing and the server little. A torn last line (a run killed
    mid-write) waits for its end; a damaged line is skipped."""

    def __init__(self) -> None:
        self._logs: dict[Path, ParsedLog] = {}
        self._lock = threading.Lock()

    def read(self, path: Path) -> ParsedLog:
        with self._lock:
            try:
                stat = path.stat()
            except OSError:
                return ParsedLog()
            log = self._logs.get(path)
            identity = (stat.st_dev, stat.st_ino)
            if log is None or log.identity != identity or stat.st_size < log.offset:
                log = self._logs[path] = ParsedLog(identity=identity)
            if stat.st_size > log.offset:
                with open(path, "rb") as handle:
                    handle.seek(log.offset)
                    chunk = handle.read(stat.st_size - log.offset)
                complete = chunk.rfind(b"\n") + 1
                for line in chunk[:complete].splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict) and isinstance(row.get("step"), int):
                        log.add(row)
                log.offset += complete
            return log


# -- datasets ---------------------------------------------------------------------------------------


def browse(workspace: Workspace, relative: str) -> dict[str, Any]:
    """A folder for the data picker: its subfolders (with image counts), its images with captions,
    and the files a run would skip, each with the reason."""
    from tuner.core.api import IMAGE_SUFFIXES, image_files, read_caption

    folder = workspace.resolve(relative or ".")
    if not folder.is_dir():
        raise NotADirectoryError(relative)
    folders, images, skipped = [], [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        if entry.name.startswith("."):
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
                skipped.append({"name": entry.name, "why": "hidden file"})
            continue
        if entry.is_dir():
            try:
                workspace.resolve(workspace.relative(entry))
            except (OutsideWorkspace, ValueError):
                continue  # a symlink out of the workspace is not shown
            folders.append({"name": entry.name, "path": workspace.relative(entry), "images": _count_images(entry)})
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            images.append(entry)
        elif entry.suffix.lower() != ".txt":
            skipped.append({"name": entry.name, "why": f"not an image ({', '.join(IMAGE_SUFFIXES)})"})
    captions = {p.stem: p for p in folder.iterdir() if p.suffix.lower() == ".txt" and not p.name.startswith(".")}
    shown = []
    for image in images:
        caption_file = captions.get(image.stem)
        caption = read_caption(caption_file, lambda message: None) if caption_file else ""
        size, why = _header_size(image)
        if why:
            skipped.append({"name": image.name, "why": why})
            continue
        shown.append({"name": image.name, "path": workspace.relative(image), "caption": caption, "size": size})
    total = len(image_files(folder))
    return {
        "path": workspace.relative(folder),
        "parent": None if folder == workspace.root else workspace.relative(folder.parent),
        "folders": folders,
        "images": shown,
        "image_count": total,
        "uncaptioned": sum(1 for item in shown if not item["caption"]),
        "skipped": skipped,
    }


def _count_images(folder: Path) -> int:
    from tuner.core.api import image_files

    try:
        return len(image_files(folder))
    except OSError:
        return 0


def _header_size(image: Path) -> tuple[list[int] | None, str | None]:
    from tuner.core.api import image_size, unreadable_errors

    try:
        width, height = image_size(image)
    except unreadable_errors() as exc:  # what the run skips as unreadable
        return None, f"unreadable image ({type(exc).__name__})"
    return [width, height], None
