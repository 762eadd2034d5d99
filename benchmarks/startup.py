"""Start-up: the CLI against `python -c pass` (alternating runs, medians), and `tuner run` from
launch to its first step, phase by phase.

    python benchmarks/startup.py [--runs 15]            # the CLI
    OMP_NUM_THREADS=1 python benchmarks/startup.py --run  # a run's start, cold and warm

``--run`` starts the README's tiny example twice in fresh processes (cold: empty caches; warm:
the same cache_dir again) and splits launch -> first step into import / settings / estimate /
caching / model load / first step; then it times the memory estimate of the real Chroma config
(``examples/models/chroma1-configs``, 1024 px, bf16) cold and warm, which is what a real run pays
at every start without the estimate cache.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "tuner --help": [sys.executable, "-m", "tuner.core.cli", "--help"],
    "tuner plugins": [sys.executable, "-m", "tuner.core.cli", "plugins"],
}


REPO = Path(__file__).resolve().parents[1]


def run_phases(cache: str, output: str, real: bool) -> dict[str, float]:
    """One start in this (fresh) process: seconds per phase."""
    times: dict[str, float] = {}
    began = time.perf_counter()
    from tuner.core.config.build import build_config
    from tuner.core.config.values import read_config_file
    from tuner.core.host.manager import PluginHost
    from tuner.core.run.trainer import Trainer

    times["import"] = time.perf_counter() - began
    mark = time.perf_counter()
    raw = read_config_file(REPO / "examples" / "chroma-tiny.yaml")
    raw.update(cache_dir=cache, output_dir=output, memory_estimate=True, max_train_steps=1, validation_steps=0)
    if real:  # the real model's config files: the estimate only (no weights here)
        raw.update(pretrained_model_name_or_path=str(REPO / "examples/models/chroma1-configs"), resolution=1024)
        raw.update(mixed_precision="bf16", tokenizer_max_length=512, aspect_bucket_alignment=64)
    host = PluginHost("chroma")
    trainer = Trainer(host, build_config(host, raw, "benchmark", warn=lambda m: None), warn=lambda m: None)
    trainer.check_folders()
    times["settings"] = time.perf_counter() - mark
    mark = time.perf_counter()
    trainer.report_memory_estimate()
    times["estimate"] = time.perf_counter() - mark
    if real:
        return times
    mark = time.perf_counter()
    prepared = trainer.prepare_data()
    times["caching"] = time.perf_counter() - mark
    mark = time.perf_counter()
    state = trainer.setup()
    times["model load"] = time.perf_counter() - mark
    mark = time.perf_counter()
    from tuner.core.data.cache import CachedDataset

    trainer.optimizer_step(state, trainer.batches(CachedDataset(prepared), state.position))
    times["first step"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - began
    return times


def run_start() -> None:
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for what, real in (("tiny example", False), ("real Chroma config, estimate", True)):
            cache = f"{tmp}/cache-{real}"
            for start in ("cold", "warm"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", cache, f"{tmp}/out-{start}-{real}", str(real)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times = json.loads(out.stdout.strip().splitlines()[-1])
                shown = ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
                print(f"{what}, {start}: {shown}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--run", action="store_true", help="time a run's start, phase by phase")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import json

        print(json.dumps(run_phases(args.child[0], args.child[1], args.child[2] == "True")))
        return
    if args.run:
        run_start()
        return
    runs = args.runs
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(runs):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c pass"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:16s} {median * 1000:7.1f} ms  ({median / base:4.1f}x python -c pass, "
            f"+{(median - base) * 1000:.0f} ms)"
        )


if __name__ == "__main__":
    main()
