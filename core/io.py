"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename."""

from __future__ import annotations

import os
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
