"""CLI start-up against `python -c pass`, measured side by side (alternating runs, medians).

python benchmarks/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "tuner --help": [sys.executable, "-m", "tuner.core.cli", "--help"],
    "tuner plugins": [sys.executable, "-m", "tuner.core.cli", "plugins"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
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
