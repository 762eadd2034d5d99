"""`tuner run --processes N`: tuner starts the processes itself (the promise that N processes train
what one does is tests/test_multiprocess.py's, which runs it)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tuner.core.cli import app

from .conftest import REPO


def test_tuner_run_processes_checks_once_then_says_a_failed_process_in_one_line(tmp_path, monkeypatch):
    """`tuner run --processes N`: the settings and data folders are checked in the parent before
    any process starts; a process that fails is one line naming it (its own message came before),
    not the launcher's traceback; inside a launcher, --processes is refused."""
    import accelerate.commands.launch as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from tuner.core.cli.launch import launch
    from tuner.core.errors import TunerError

    started = []
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: started.append(args))
    missing = tmp_path / "no-such-folder"
    out = CliRunner().invoke(
        app,
        ["run", "-c", str(REPO / "examples" / "chroma-tiny.yaml"), "--processes", "2", "--set", f"data_dir={missing}"],
    )
    assert out.exit_code != 0 and not started and str(missing) in str(out.exception)

    def failing(args):
        failure = ProcessFailure(local_rank=1, pid=4242, exitcode=1, error_file="")
        raise ChildFailedError("tuner.core.cli", {1: failure})

    monkeypatch.setattr(accelerate_launch, "launch_command", failing)
    with pytest.raises(
        TunerError, match=r"^2 processes: process 1 stopped with exit code 1; its own message is above$"
    ):
        launch(2, ["run", "--config", "x.yaml"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TunerError, match="already one of several processes"):
        launch(2, ["run", "--config", "x.yaml"])
