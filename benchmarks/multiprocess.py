"""DDP against FSDP2 (``fsdp_enable``) in N processes: step time of a LoRA and of a full fine-tune,
the ratio side by side in one run, and each process's peak memory against ``tuner estimate
--processes N``'s figure for it.

    python benchmarks/multiprocess.py                  # 2 gloo processes on this CPU, a narrow Chroma
    python benchmarks/multiprocess.py --gpu --processes 8 --depth 4 8   # GPUs: the real widths, 4+8 blocks

Each configuration is one ``torchrun`` launch of this file as a worker: tuner's own Trainer
(caches, model, LoRA or full weights, sharding) takes ``--warmup`` steps, then ``--steps`` timed
steps. The main process prints one JSON line per configuration; the table follows. On a CPU the
peak is the process's resident set over the timed steps (``VmHWM`` after a reset: libraries
included, loading excluded) against the estimate's system-RAM figure for the training phase; on a GPU ``max_memory_allocated`` against the estimate's
device figure. Run it on a quiet machine: processes compete for cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "MULTIPROCESS-RESULT "


def _gpu_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings(model: Path, data: Path, folder: Path, kind: str, fsdp: bool, gpu: bool, resolution: int) -> dict:
    values = {
        "model_family": "chroma",
        "pretrained_model_name_or_path": str(model),
        "data_dir": str(data),
        "output_dir": str(folder / f"out-{kind}-{'fsdp' if fsdp else 'ddp'}"),
        "cache_dir": str(folder / "cache"),
        "resolution": resolution,
        "tokenizer_max_length": 32,
        "train_batch_size": 1,
        "max_train_steps": 1000,
        "learning_rate": 1e-4,
        "mixed_precision": "bf16" if gpu else "no",
        "gradient_checkpointing": True,
        "fsdp_enable": fsdp,
        "memory_estimate": False,
        "validation_prompts": [],
        "model_type": kind,
        "seed": 0,
    }
    if kind == "lora":
        values.update(network_rank=16, flux_lora_target="all")
    return values


def worker(args: argparse.Namespace) -> None:
    import torch

    from tuner.core.config.build import build_config
    from tuner.core.data.cache import CachedDataset
    from tuner.core.estimate import estimate_precisions
    from tuner.core.estimate.sharded import per_process
    from tuner.core.host.manager import PluginHost
    from tuner.core.run.trainer import Trainer

    host = PluginHost("chroma")
    values = settings(
        Path(args.model), Path(args.data), Path(args.folder), args.kind, args.fsdp, args.gpu, args.resolution
    )
    config = build_config(host, values, "benchmark", warn=lambda message: None)
    trainer = Trainer(host, config, warn=lambda message: None)
    prepared = trainer.prepare_data()
    state = trainer.setup()
    batches = trainer.batches(CachedDataset(prepared, config.seed), state.position)
    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        trainer.ctx.accelerator.wait_for_everyone()

    for _ in range(args.warmup):
        trainer.optimizer_step(state, batches)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:  # the resident peak from here on, not the loading's (Linux: "5" resets VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    resident_at_start = 0 if cuda else resident_peak()  # just reset: what the process holds before the steps
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.optimizer_step(state, batches)
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    processes = trainer.ctx.accelerator.num_processes
    device_type = "cuda" if cuda else "cpu"
    found = per_process(estimate_precisions(host, config, ["no_change"], device_type)[0], config, processes)
    train = found.phase("train")
    peak = torch.cuda.max_memory_allocated() if cuda else resident_peak()
    peaks = trainer.ctx.accelerator.gather(torch.tensor([peak], device=trainer.ctx.device)).tolist()
    if trainer.ctx.is_main:
        row = {
            "kind": args.kind,
            "sharding": "fsdp2" if args.fsdp else "ddp",
            "processes": processes,
            "step_s": step_s,
            "peak_bytes_per_process": peaks,
            "resident_before_steps_bytes": resident_at_start,
            "estimate_bytes_per_process": train.device if cuda else train.ram,
            "measured": "max_memory_allocated" if cuda else "VmHWM over the timed steps (libraries included)",
        }
        print(MARK + json.dumps(row), flush=True)
    trainer.ctx.accelerator.end_training()  # the process group ended as a run ends it, not at interpreter exit


def resident_peak() -> int:
    """VmHWM: the most resident memory since the last reset (libraries included)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, model: Path, data: Path, kind: str, fsdp: bool) -> dict:
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes)),
        *("--master-addr", "127.0.0.1", "--master-port", str(free_port())),
        __file__,
        *("--worker", "--kind", kind, "--model", str(model), "--data", str(data), "--folder", str(args.folder)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup), "--resolution", str(args.resolution)),
        *(["--fsdp"] if fsdp else []),
        *(["--gpu"] if args.gpu else []),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not args.gpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.processes)))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{kind} {'fsdp2' if fsdp else 'ddp'} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--gpu", action="store_true", help="the real widths in bf16 on GPUs")
    parser.add_argument("--wide", action="store_true", help="the real widths on the CPU (fp32)")
    parser.add_argument("--depth", type=int, nargs=2, default=(4, 8), help="--gpu, --wide: double and single blocks")
    parser.add_argument("--kinds", nargs="+", default=["lora", "full"])
    parser.add_argument("--folder", type=Path, default=REPO / "output" / "benchmark-multiprocess")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    args.folder.mkdir(parents=True, exist_ok=True)
    gpu = _gpu_benchmark()
    small = not (args.gpu or args.wide)
    folder = args.folder / ("small" if small else f"wide-{args.depth[0]}-{args.depth[1]}")
    model, data = gpu.build(folder, "cuda" if args.gpu else "cpu", small, args.resolution, tuple(args.depth))
    rows = []
    for kind in args.kinds:
        for fsdp in (False, True):
            rows.append(launch(args, model, data, kind, fsdp))
    print(
        "| kind | sharding | processes | step s | vs DDP | before the steps | peak per process | estimate per process |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ddp = next(r for r in rows if r["kind"] == row["kind"] and r["sharding"] == "ddp")
        peak = max(row["peak_bytes_per_process"])
        print(
            f"| {row['kind']} | {row['sharding']} | {row['processes']} | {row['step_s']:.3f} | "
            f"{row['step_s'] / ddp['step_s']:.2f}x | {gib(row['resident_before_steps_bytes'])} | {gib(peak)} | "
            f"{gib(row['estimate_bytes_per_process'])} |"
        )
    print(f"peak: {rows[0]['measured']}")
    return rows


if __name__ == "__main__":
    main()
