"""A workspace and a live ``tuner server`` for the web UI tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

TOKEN = "test-token-0123456789"


def make_workspace(root: Path, model: Path, data: Path) -> Path:
    """A workspace as a user has one: a model folder and a dataset inside it."""
    workspace = root / "workspace"
    shutil.copytree(model, workspace / "models" / "tiny-chroma")
    shutil.copytree(data, workspace / "data" / "shapes")
    return workspace


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def live_server(workspace: Path, port: int | None = None, max_running: int = 1):
    """``tuner server`` in a thread of this process (its jobs are real ``tuner`` processes)."""
    import uvicorn

    from tuner.plugins.webui.app import create_app

    port = port or free_port()
    app = create_app(workspace, TOKEN, port=port, max_running=max_running)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("tuner server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        end_jobs(app)


def end_jobs(app) -> None:
    """Jobs run in their own sessions (a server restart must not end them): a test ends what it
    started, so no run keeps training after a failed test."""
    jobs = app.app.state.jobs
    jobs.close()
    for job in jobs.running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job["pid"], signal.SIGKILL)
    jobs.tick()
