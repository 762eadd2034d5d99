"""Atomic writes: complete or absent, and with the permissions any other file would get."""

from __future__ import annotations

import os
import stat

import pytest

from tuner.core.io import atomic_write


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, mask, mode):
    previous = os.umask(mask)
    try:
        path = atomic_write(tmp_path / "out.json", lambda tmp: open(tmp, "w").write("{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_text() == "{}" and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = atomic_write(tmp_path / "out.txt", lambda tmp: open(tmp, "w").write("old"))

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_text() == "old" and not list(tmp_path.glob(".*.tmp"))
