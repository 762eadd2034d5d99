"""Does watching a run slow it down? 20 browser-like clients poll a training run's page through
``tuner server`` for a minute; the run's step rate is measured before, during and after.

    OMP_NUM_THREADS=1 python benchmarks/webui_load.py [--clients 20] [--seconds 60] [--quiet 20]

Everything runs as it would for a user: ``tuner server`` in its own process, the run started
through the API as a ``tuner run`` process (the bundled tiny Chroma and shapes, 64 px), and each
client asks what the run page asks every second (``/api/run/<run>?since=N``) plus the run list
every two seconds. Prints one JSON object: steps/s quiet before, under load and quiet after, the
ratio of step times (loaded / mean of the quiet windows), requests served, errors and latencies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKEN = "benchmark"


def request(port: int, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    headers = {"X-Tuner-Token": TOKEN, "Content-Type": "application/json"}
    with urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, headers), timeout=30
    ) as r:
        return json.loads(r.read())


def steps_logged(log: Path) -> int:
    try:
        return sum(1 for line in log.read_text().splitlines() if line.endswith("}"))
    except OSError:
        return 0


def step_rate(log: Path, seconds: float) -> float:
    start, began = steps_logged(log), time.monotonic()
    time.sleep(seconds)
    return (steps_logged(log) - start) / (time.monotonic() - began)


def client(port: int, run: str, stop: threading.Event, latencies: list[float], errors: list[str]) -> None:
    since, tick = 0, 0
    while not stop.is_set():
        began = time.monotonic()
        try:
            since = request(port, f"/api/run/{run}?since={since}")["next"]
            if tick % 2 == 0:
                request(port, "/api/runs")
            latencies.append(time.monotonic() - began)
        except Exception as exc:  # counted, not raised: the figure is how many failed
            errors.append(repr(exc))
        tick += 1
        stop.wait(max(0.0, 1.0 - (time.monotonic() - began)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--quiet", type=float, default=20, help="seconds measured without clients, before and after")
    args = parser.parse_args()

    workspace = Path(tempfile.mkdtemp(prefix="tuner-webui-load-"))
    shutil.copytree(REPO / "examples" / "models" / "tiny-chroma", workspace / "models" / "tiny-chroma")
    shutil.copytree(REPO / "examples" / "data" / "shapes", workspace / "data" / "shapes")
    port = free_port()
    env = {**os.environ, "TUNER_SERVER_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "tuner.core.cli", "server", "--port", str(port)],
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                request(port, "/api/runs")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        values = {
            "pretrained_model_name_or_path": "models/tiny-chroma",
            "data_dir": "data/shapes",
            "output_dir": "output/load",
            "resolution": "64",
            "tokenizer_max_length": "16",
            "mixed_precision": "no",
            "max_train_steps": "1000000",
            "checkpointing_steps": "0",
            "memory_estimate": False,
        }
        run = request(port, "/api/start", {"family": "chroma", "values": values})["run"]
        log = workspace / run / "train_log.jsonl"
        while steps_logged(log) < 50:  # caching, loading and the first steps are not measured
            time.sleep(0.5)
        before = step_rate(log, args.quiet)
        stop, latencies, errors = threading.Event(), [], []
        clients = [
            threading.Thread(target=client, args=(port, run, stop, latencies, errors), daemon=True)
            for _ in range(args.clients)
        ]
        for thread in clients:
            thread.start()
        loaded = step_rate(log, args.seconds)
        stop.set()
        for thread in clients:
            thread.join()
        after = step_rate(log, args.quiet)
        request(port, f"/api/run/{run}/stop", {})
        quiet_step = (1 / before + 1 / after) / 2
        latencies.sort()
        print(
            json.dumps(
                {
                    "clients": args.clients,
                    "seconds": args.seconds,
                    "steps_per_s_quiet_before": round(before, 2),
                    "steps_per_s_loaded": round(loaded, 2),
                    "steps_per_s_quiet_after": round(after, 2),
                    "step_time_loaded_over_quiet": round((1 / loaded) / quiet_step, 3),
                    "polls": len(latencies),  # each: the run page's request, every second one the run list too
                    "errors": len(errors),
                    "first_error": errors[0] if errors else None,
                    "latency_ms_p50": round(1000 * statistics.median(latencies), 1) if latencies else None,
                    "latency_ms_p95": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1)
                    if latencies
                    else None,
                },
                indent=1,
            )
        )
    finally:
        time.sleep(2)
        server.terminate()
        server.wait(timeout=10)
        for folder in (workspace / "output").glob("*"):
            record = folder / "run.json"
            if record.exists():
                pid = json.loads(record.read_text()).get("pid")
                try:
                    os.kill(pid, 9)
                except (ProcessLookupError, TypeError):
                    pass
        shutil.rmtree(workspace, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
