"""Atomic file writes: write to a temporary name in the same folder (named after the writing
process), fsync, then rename; and which writer is still alive, so a temporary left by a killed
one can be removed."""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` only once it is complete on disk.

    A crash or Ctrl-C mid-write leaves the previous file (if any) intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid and host in the name: remove_stale_temporaries removes it once that writer is gone
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}@{socket.gethostname()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a plain open would honour the umask
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


# what atomic_write names its temporary: .<file>.<pid>@<host>.<8 random characters>.tmp
TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>.+)\.\w{8}\.tmp$")
TEMPORARIES_LOCK = ".temporaries.lock"


def remove_stale_temporaries(folder: str | Path) -> list[str]:
    """Remove the temporaries :func:`atomic_write` left in ``folder`` when its writer was killed
    (``kill -9``, a power cut): only those whose writer ran on this machine and is gone, under a
    lock on the folder so two cleaners (runs sharing a cache) take turns. A live writer's
    temporary, another machine's, or a file not named like one is never touched. Returns the
    names removed."""
    import fcntl

    folder = Path(folder)
    this_host = socket.gethostname()
    removed = []
    try:
        with open(folder / TEMPORARIES_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for entry in folder.iterdir():
                found = TEMPORARY.match(entry.name)
                if found and found["host"] == this_host and not process_alive(int(found["pid"])):
                    entry.unlink(missing_ok=True)
                    removed.append(entry.name)
    except OSError:  # a read-only or vanished folder: nothing to clean, nothing to stop for
        return removed
    return sorted(removed)


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    from tuner.core.fixes import as_os_error

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except Exception as exc:  # safetensors' own error for a full disk: an OSError (see fixes.py)
            raise as_os_error(exc, str(path)) from None

    return atomic_write(path, write)


def resolved_if_local(value: Any) -> Any:
    """A value naming an existing local path, made absolute (``models/x``, ``./models/x/`` and
    ``/abs/models/x`` are one folder); anything else (a hub id, a number) as it is."""
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot serve as a folder tuner writes to (a file there or above it, a read-only
    mount, no permission), or None; creates the folder."""
    folder = Path(path)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a folder" + ("" if existing == folder else f" (a parent of {folder})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # what os.access cannot tell: a read-only mount, even as root
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror or exc})"
    return None


def process_started(pid: int) -> int | None:
    """When a process started (clock ticks after boot, from /proc), or None where /proc is absent."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: Any, host: Any = None, started: Any = None) -> bool:
    """Whether the run's process still exists (on this machine: another host's pid cannot be checked
    and counts as alive). ``started`` (:func:`process_started` of the original) rules out another
    process that was given the same pid later."""
    if host not in (None, socket.gethostname()):
        return True
    if not isinstance(pid, int) or pid <= 0:
        return False
    if started is not None and process_started(pid) not in (None, started):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
