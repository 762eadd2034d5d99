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


def test_output_and_cache_folders_are_checked_before_any_heavy_work(tiny_chroma, shapes_dir, tmp_path):
    from tuner.core.errors import ConfigError

    from .conftest import base_settings, train

    (tmp_path / "a-file").write_text("not a folder")
    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "memory_estimate": True}
    with pytest.raises(ConfigError, match=r"^test.yaml: output_dir: .*a-file is a file, not a folder$"):
        train({**settings, "output_dir": str(tmp_path / "a-file")})
    with pytest.raises(ConfigError, match=r"^test.yaml: cache_dir: .*a-file is a file, not a folder \(a parent of "):
        train({**settings, "cache_dir": str(tmp_path / "a-file" / "cache")})
    assert not (tmp_path / "cache").exists()  # nothing was cached or loaded first
