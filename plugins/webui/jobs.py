"""Jobs the UI starts: ``tuner run`` and ``tuner sample`` as their own processes (argument lists, no
shell, a new session each, so a server restart or Ctrl-C does not reach them), queued so that at
most ``max_running`` use the accelerator at once. Runs started from a terminal count too.

The queue, the processes it started and the jobs that ended are kept in
``<workspace>/.tuner-server/jobs.json``: a restarted server re-attaches to the ones still running
and starts the ones still waiting. A run's console goes to ``.tuner-server/logs/<folder>-<hash>.log``,
never into its ``output_dir``: a run the CLI refuses before it begins leaves no folder behind, and still
shows in the runs list with its error (:meth:`Jobs.refused_runs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tuner.core.api import atomic_write, process_alive, process_started, read_run
from tuner.plugins.webui.workspace import LIVE, Workspace

STATE_FOLDER = ".tuner-server"
KEPT_FINISHED = 200  # ended jobs remembered (their logs stay in the state folder)


def tuner_command() -> list[str]:
    """How a job calls the CLI: this interpreter, so the job sees the same installed plugins."""
    return [sys.executable, "-m", "tuner.core.cli"]


class Jobs:
    def __init__(self, workspace: Workspace, max_running: int = 1, poll_s: float = 0.5) -> None:
        self.workspace = workspace
        self.max_running = max_running
        self.poll_s = poll_s
        self.file = workspace.root / STATE_FOLDER / "jobs.json"
        self._lock = threading.RLock()
        self._children: dict[int, subprocess.Popen] = {}
        self._returncodes: dict[int, int] = {}  # of this server's children, once reaped
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        state = self._read()
        self.queued: list[dict[str, Any]] = state.get("queued", [])
        self.running: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = state.get("finished", [])
        for job in state.get("running", []):  # those that ended while no server watched: exit code unknown
            (self.running if self._alive(job) else self.finished).append(job)

    # -- the scheduler ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tuner-jobs", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.poll_s)

    def tick(self) -> None:
        """Reap finished jobs and launch waiting ones while the accelerator has room."""
        with self._lock:
            ended = [job for job in self.running if not self._alive(job)]
            for job in ended:
                self.running.remove(job)
                self.finished.append(
                    {**job, "ended": time.time(), "returncode": self._returncodes.pop(job["pid"], None)}
                )
            self.finished = self.finished[-KEPT_FINISHED:]
            changed = bool(ended)
            while self.queued and self.busy() < self.max_running:
                self._launch(self.queued.pop(0))
                changed = True
            if changed:
                self._save()

    def busy(self) -> int:
        """Jobs of this server still running, plus runs started elsewhere (a terminal) on this machine."""
        ours = {str(Path(job["output_dir"]).resolve()) for job in self.running}
        others = 0
        for folder in self.workspace.run_folders():
            record = read_run(folder) or {}
            if (
                str(folder.resolve()) not in ours
                and record.get("status") in LIVE
                and process_alive(record.get("pid"), record.get("host"), record.get("pid_started"))
            ):
                others += 1
        return len(self.running) + others

    # -- jobs -------------------------------------------------------------------------------------

    def submit(
        self, kind: str, argv: list[str], output_dir: Path, log: Path | None = None, label: str = ""
    ) -> dict[str, Any]:
        """Queue a job; its console goes to ``log``, by default the run folder's log in the state
        folder (each job appends to it, as a terminal would show them one after the other)."""
        job_id = uuid.uuid4().hex[:12]
        log = log or self.console_of(output_dir)
        job = {
            "id": job_id,
            "kind": kind,
            "argv": argv,
            "output_dir": str(output_dir),
            "log": str(log),
            "label": label,
            "submitted": time.time(),
        }
        with self._lock:
            self.queued.append(job)
            self._save()
        self.tick()
        return job

    def _launch(self, job: dict[str, Any]) -> None:
        log = Path(job["log"])
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as output:
            output.write(f"\n$ tuner {' '.join(job['argv'][len(tuner_command()) :])}\n".encode())
            output.flush()
            process = subprocess.Popen(  # an argument list: no shell ever parses a value from the UI
                job["argv"],
                cwd=self.workspace.root,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a server restart or its Ctrl-C does not reach the job
                env=env,
            )
        self._children[process.pid] = process
        self.running.append(
            {**job, "pid": process.pid, "pid_started": process_started(process.pid), "started": time.time()}
        )

    def _alive(self, job: dict[str, Any]) -> bool:
        child = self._children.get(job.get("pid", -1))
        if child is not None:
            if child.poll() is None:
                return True
            self._returncodes[child.pid] = child.returncode
            del self._children[child.pid]
            return False
        return process_alive(job.get("pid"), None, job.get("pid_started"))

    def waiting(self) -> list[dict[str, Any]]:
        """A snapshot of the queued jobs, in their order."""
        with self._lock:
            return [dict(job) for job in self.queued]

    def job_for(self, output_dir: Path) -> dict[str, Any] | None:
        """The queued or running job of a run folder, if any."""
        wanted = str(output_dir.resolve())
        with self._lock:
            for state, jobs in (("running", self.running), ("queued", self.queued)):
                for job in jobs:
                    if str(Path(job["output_dir"]).resolve()) == wanted and (state == "queued" or self._alive(job)):
                        return {**job, "state": state}
        return None

    def console_of(self, output_dir: Path) -> Path:
        """Where the run jobs of ``output_dir`` write their console: the state folder, never the run's."""
        resolved = str(Path(output_dir).resolve())
        digest = hashlib.sha1(resolved.encode()).hexdigest()[:10]
        return self.file.parent / "logs" / f"{Path(resolved).name[:60]}-{digest}.log"

    def last_run_job(self, output_dir: Path) -> dict[str, Any] | None:
        """The newest ``run`` job (queued, running or ended) of a run folder."""
        wanted = str(output_dir.resolve())
        with self._lock:
            for job in [*reversed(self.queued), *reversed(self.running), *reversed(self.finished)]:
                if job["kind"] == "run" and str(Path(job["output_dir"]).resolve()) == wanted:
                    return dict(job)
        return None

    def refused_runs(self) -> list[dict[str, Any]]:
        """Ended run jobs whose folder holds no run: the CLI refused them before the run began (a
        config error, missing data). The newest per folder."""
        with self._lock:
            ended = list(reversed(self.finished))
        found: dict[str, dict[str, Any]] = {}
        for job in ended:
            folder = Path(job["output_dir"])
            if job["kind"] == "run" and not (folder / "run.json").exists() and str(folder) not in found:
                found[str(folder)] = job
        return list(found.values())

    def stop(self, output_dir: Path) -> str:
        """Cancel a queued job, or ask a running one to stop as Ctrl-C does (SIGTERM: it saves a
        checkpoint). Returns what was done."""
        wanted = str(output_dir.resolve())
        with self._lock:
            for job in list(self.queued):
                if str(Path(job["output_dir"]).resolve()) == wanted:
                    self.queued.remove(job)
                    self._save()
                    return "removed from the queue"
            pids = [job["pid"] for job in self.running if str(Path(job["output_dir"]).resolve()) == wanted]
        record = read_run(output_dir) or {}
        if (
            not pids
            and record.get("status") in LIVE
            and process_alive(record.get("pid"), record.get("host"), record.get("pid_started"))
        ):
            pids = [record["pid"]]  # a run started from a terminal
        if not pids:
            return "not running"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return "stopping: the run finishes its step and saves a checkpoint"

    # -- persistence ------------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        try:
            state = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _save(self) -> None:
        text = json.dumps({"queued": self.queued, "running": self.running, "finished": self.finished}, indent=1)
        atomic_write(self.file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
