"""How close `tuner estimate` lands to measured memory, on the tiny and a mid-size Chroma (CPU, fp32).

    OMP_NUM_THREADS=1 python benchmarks/estimate_accuracy.py
    OMP_NUM_THREADS=1 python benchmarks/estimate_accuracy.py --methods   # each adapter type and method

Each case runs in a process of its own: the caches are built, the estimate is taken (on fake
tensors, before any denoiser weight is loaded, as `tuner run` does), then the real run loads
the denoiser and takes two training steps. Two measurements of the same run:
- live: the peak bytes of live tensors during the second step, counted on the real tensors
  (what torch.cuda.max_memory_allocated would report on a GPU), against the estimate's train phase;
- RSS: the growth of the process's peak resident size (VmHWM, reset before loading), after loading
  the denoiser (against the estimate's load phase) and after both steps (against its peak RAM),
  each less the process's size when it estimated. This includes what no tensor count sees:
  malloc's slack, lazily loaded kernels, Python objects.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ["no_change", "int8-quanto", "int4-quanto", "nf4-bnb"]


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


# the training methods the estimate must count (--methods): what each adds to the settings
METHODS = {
    "lora": {},
    "dora": {"lora_type": "dora"},
    "lokr": {"lora_type": "lokr"},
    "loha": {"lora_type": "loha"},
    "ema": {"use_ema": True},
    "rollout (k <= 2)": {"scheduled_sampling_max_step_offset": 2, "scheduled_sampling_probability": 1.0},
    "caption dropout": {"caption_dropout_probability": 0.5},
    "accumulation 2": {"gradient_accumulation_steps": 2},
}


def measure(
    model: Path, data: Path, work: Path, precision: str, checkpointing: bool, extra: dict | None = None
) -> dict:
    import torch

    from tuner.core.config.build import build_config
    from tuner.core.data.cache import CachedDataset
    from tuner.core.estimate import LiveBytes, estimate
    from tuner.core.host.manager import PluginHost
    from tuner.core.model.quantize import release_freed_memory
    from tuner.core.run.trainer import Trainer

    host = PluginHost("chroma")
    settings = {
        "pretrained_model_name_or_path": str(model),
        "data_dir": str(data),
        "cache_dir": str(work / "cache"),
        "output_dir": str(work / "out"),
        "resolution": 256,
        "tokenizer_max_length": 32,
        "network_rank": 16,
        "train_batch_size": 2,
        "mixed_precision": "no",
        "gradient_checkpointing": checkpointing,
        "base_model_precision": precision,
        "memory_estimate": False,
        "seed": 0,
        **(extra or {}),
    }
    config = build_config(host, settings, "benchmark", warn=lambda m: None)
    trainer = Trainer(host, config, warn=lambda m: None)
    prepared = trainer.prepare_data()
    found = estimate(host, config, "cpu")
    if precision != "no_change":  # the backend's native libraries load at first use: not the model's memory
        warm = torch.nn.Sequential(torch.nn.Linear(256, 256))
        host.precisions[precision].quantize(warm, "", [])
        warm(torch.randn(1, 256)).sum()
        del warm
    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kib("VmRSS")
    transformer = trainer.load_transformer()
    loaded = (rss_kib("VmHWM") - before) * 1024
    state = trainer.setup(transformer)
    batches = trainer.batches(CachedDataset(prepared), state.position)
    trainer.optimizer_step(state, batches)
    info = host.precisions.get(precision)
    with LiveBytes(info.stored_tensors if info else None) as live:
        live.track(state.model, state.optimizer.state, state.ema.average if state.ema else {})
        trainer.optimizer_step(state, batches)
    train = found.phase("train")
    load = found.phases[0]
    baseline = train.ram - train.device
    return {
        "precision": precision,
        "checkpointing": checkpointing,
        "parameters": found.settings["transformer_parameters"],
        "estimated_train": train.device,
        "measured_live": live.peak,
        "estimated_ram_growth": max(load.ram, train.ram) - baseline,
        "measured_rss_growth": (rss_kib("VmHWM") - before) * 1024,
        "estimated_load_growth": load.ram - baseline,
        "measured_load_growth": loaded,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--methods", action="store_true", help="each adapter type and training method (mid-size)")
    args = parser.parse_args()
    if args.one:
        job = json.loads(args.one)
        work = Path(job["work"])
        print(json.dumps(measure(Path(job["model"]), Path(job["data"]), work, job["p"], job["c"], job.get("extra"))))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from quantization import build

    folder = Path(tempfile.mkdtemp(prefix="tuner-estimate-bench-"))
    build(folder)  # the mid-size Chroma of the quantization benchmark, and a dataset
    models = {"tiny": REPO / "examples" / "models" / "tiny-chroma", "mid-size": folder / "model"}
    if args.methods:
        print("| method (mid-size, no_change, checkpointing on) | train: estimate / live |")
        print("|---|---|")
        for label, extra in METHODS.items():
            job = {"model": str(models["mid-size"]), "data": str(folder / "data"), "work": str(folder / "methods")}
            job.update(p="no_change", c=True, extra=extra)
            out = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True, check=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {label} | {ratio(r['estimated_train'], r['measured_live'])} |", flush=True)
        return
    print(
        "| model | base | checkpointing | train: estimate / live | load RAM: estimate / RSS | run RAM: estimate / RSS |"
    )
    print("|---|---|---|---|---|---|")
    for label, model in models.items():
        for precision in PRECISIONS:
            for checkpointing in (False, True):
                job = {"model": str(model), "data": str(folder / "data"), "work": str(folder / label)}
                job.update(p=precision, c=checkpointing)
                out = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True, check=True
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                cells = [
                    ratio(r["estimated_train"], r["measured_live"]),
                    ratio(r["estimated_load_growth"], r["measured_load_growth"]),
                    ratio(r["estimated_ram_growth"], r["measured_rss_growth"]),
                ]
                print(
                    f"| {label} ({r['parameters'] / 1e6:.1f}M) | {precision} | {'on' if checkpointing else 'off'} | "
                    + " | ".join(cells)
                    + " |",
                    flush=True,
                )


def ratio(estimated: int, measured: int) -> str:
    return f"{estimated / 2**20:.1f} / {measured / 2**20:.1f} MiB = {estimated / measured:.2f}"


if __name__ == "__main__":
    main()
