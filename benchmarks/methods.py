"""Training methods against plain LoRA + AdamW on the mid-size Chroma: step time and memory per
optimizer, per adapter type (DoRA, LoKr, LoHa at the same rank), with an EMA, and with scheduled
sampling at k = 1, 2, 4 rollout steps.

    OMP_NUM_THREADS=1 python benchmarks/methods.py [--steps 20] [--warmup 3] [--small]

Each variant is tuner's full loop (``Trainer.train``, timed from its JSONL log), in a process of
its own (its peak resident memory is its own; ``--small`` runs them in this process), on the
model of step_overhead.py; the plain AdamW run is repeated at the start, the middle and the
end, and every ratio is against the mean of those three, so drift in machine speed shows. Memory:
the bytes of what the method keeps (adapter, optimizer state, EMA), counted from the tensors
themselves, the process's peak resident memory, and on CUDA the peak allocated. Rollouts run with probability 1: the
cost of rolling out every sample. ``--small`` uses the tiny Chroma (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_overhead import MID_SIZE  # noqa: E402

VARIANTS = {
    "adamw (plain LoRA)": {},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "adafactor": {"optimizer": "adafactor"},
    "prodigy": {"optimizer": "prodigy", "learning_rate": 1.0},
    "dora": {"lora_type": "dora"},
    "lokr (factor -1)": {"lora_type": "lokr"},
    "loha": {"lora_type": "loha"},
    "adamw + EMA (accelerator)": {"use_ema": True},
    "adamw + EMA (cpu)": {"use_ema": True, "ema_device": "cpu"},
    "rollout k=1": {"scheduled_sampling_max_step_offset": 1},
    "rollout k=2": {"scheduled_sampling_max_step_offset": 2},
    "rollout k=4": {"scheduled_sampling_max_step_offset": 4},
}
ROLLOUT = {"scheduled_sampling_probability": 1.0, "scheduled_sampling_strategy": "biased_late"}


def tensors_bytes(found) -> int:
    from torch.utils._pytree import tree_leaves

    return sum(t.numel() * t.element_size() for t in tree_leaves(found) if isinstance(t, torch.Tensor))


def run(settings: dict, steps: int, warmup: int, isolated: bool) -> dict:
    """One variant; ``isolated``: in a process of its own, so its peak resident memory is its own."""
    if not isolated:
        return run_here(settings, steps, warmup)
    command = [sys.executable, __file__, "--one", json.dumps(settings), "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{settings}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_here(settings: dict, steps: int, warmup: int) -> dict:
    import resource

    from tuner.core.config.build import build_config
    from tuner.core.host.manager import PluginHost
    from tuner.core.run.trainer import Trainer

    host = PluginHost("chroma")
    config = build_config(host, {**settings, "max_train_steps": warmup + steps}, "benchmark", warn=lambda m: None)
    trainer = Trainer(host, config, warn=lambda m: None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    rows = [json.loads(line) for line in (Path(settings["output_dir"]) / "train_log.jsonl").read_text().splitlines()]
    state = trainer.state
    inner = getattr(state.optimizer, "optimizer", state.optimizer)
    return {
        "step_s": (rows[-1]["elapsed_s"] - rows[warmup - 1]["elapsed_s"]) / steps,
        "adapter_bytes": tensors_bytes(list(state.params)),
        "optimizer_bytes": tensors_bytes(list(inner.state.values())),
        "ema_bytes": tensors_bytes(state.ema.state_dict()) if state.ema else 0,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "parameters": sum(p.numel() for p in state.model.parameters()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="the tiny Chroma, a few steps (CI)")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a variant's settings, in this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_here(json.loads(args.one), args.steps, args.warmup)))
        return []
    from tuner.plugins.chroma.tiny import build_tiny_chroma
    from tuner.testing import shapes_dataset

    tmp = args.folder or Path(tempfile.mkdtemp(prefix="tuner-methods-"))
    model = build_tiny_chroma(tmp / "model", seed=0, **({} if args.small else MID_SIZE))
    settings = {
        "pretrained_model_name_or_path": str(model),
        "data_dir": str(shapes_dataset(tmp / "data", size=64 if args.small else 128)),
        "cache_dir": str(tmp / "cache"),
        "resolution": 64 if args.small else args.resolution,
        "tokenizer_max_length": 16 if args.small else 32,
        "network_rank": 16,
        "train_batch_size": 2,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "memory_estimate": False,
        "report_to": "none",
        "seed": 0,
    }
    names = list(VARIANTS)
    middle = len(names) // 2
    order = [names[0], *names[1:middle], names[0], *names[middle:], names[0]]  # the baseline at start, middle, end
    results: dict[str, list[dict]] = {}
    for index, name in enumerate(order):
        extra = {**VARIANTS[name], **(ROLLOUT if "rollout" in name else {})}
        variant = {**settings, **extra, "output_dir": str(tmp / f"out{index}")}
        measured = run(variant, args.steps, args.warmup, isolated=not args.small)
        results.setdefault(name, []).append(measured)
    base = statistics.mean(r["step_s"] for r in results[names[0]])
    first = results[names[0]][0]
    print(
        f"model: Chroma {first['parameters'] / 1e6:.1f}M parameters, LoRA rank 16 ({first['adapter_bytes'] / 2**20:.1f} "
        f"MiB fp32), batch 2 at {settings['resolution']}px, fp32, torch threads {torch.get_num_threads()}, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}"
    )
    print(
        "| method | ms/step | / plain AdamW | adapter | optimizer state | EMA | peak RSS (+ over plain) | peak CUDA |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        step = statistics.mean(r["step_s"] for r in results[name])
        one = results[name][0]
        peak = one["peak_cuda_bytes"]
        rows.append({"method": name, "step_s": step, "ratio": step / base, **one})
        rounds = ", ".join(f"{r['step_s'] * 1000:.1f}" for r in results[name])
        print(
            f"| {name} | {step * 1000:.1f}"
            + (f" ({rounds})" if len(results[name]) > 1 else "")
            + f" | {step / base:.2f} | "
            f"{one['adapter_bytes'] / 2**20:.2f} MiB | {one['optimizer_bytes'] / 2**20:.2f} MiB | "
            f"{one['ema_bytes'] / 2**20:.2f} MiB | {one['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"({(one['peak_rss_bytes'] - first['peak_rss_bytes']) / 2**20:+.0f}) | "
            + (f"{peak / 2**20:.0f} MiB |" if peak else "n/a |")
        )
    return rows


if __name__ == "__main__":
    main()
