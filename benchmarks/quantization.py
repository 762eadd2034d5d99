"""Quantized bases on a mid-size Chroma: weight bytes, peak RAM while quantizing, output error, step time.

    OMP_NUM_THREADS=1 python benchmarks/quantization.py [--steps 8]

Each precision is measured in a process of its own (so peak RSS is its own):
- weight bytes of the denoiser as stored, relative to the bf16 model;
- peak RSS growth while loading + quantizing (VmHWM after resetting it), relative to the
  quantized model's bytes: streaming block by block keeps this near 1;
- relative output error ||q - f|| / ||f|| against the fp32 model on a fixed input, with the
  family's high-precision exclusions and with everything quantized (as the reference trainer does);
- seconds per LoRA training step (fp32 compute on this CPU) relative to the unquantized model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRECISIONS = ["no_change", "int8-quanto", "int4-quanto", "nf4-bnb", "fp8-quanto"]
MID_SIZE = dict(
    num_layers=2,
    num_single_layers=6,
    attention_head_dim=64,
    num_attention_heads=16,
    axes_dims_rope=(8, 28, 28),
    approximator_hidden_dim=512,
    approximator_layers=2,
)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def build(folder: Path) -> None:
    """A mid-size random Chroma (transformer saved in bf16) plus the tiny T5/VAE and a dataset."""
    from diffusers import ChromaTransformer2DModel

    from tuner.plugins.chroma.tiny import build_tiny_chroma
    from tuner.testing import shapes_dataset

    build_tiny_chroma(folder / "model", seed=0)
    transformer = ChromaTransformer2DModel.from_pretrained(folder / "model", subfolder="transformer")
    config = {**transformer.config, **MID_SIZE}
    torch.manual_seed(0)
    big = ChromaTransformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    big.to(torch.bfloat16).save_pretrained(folder / "model" / "transformer")
    shapes_dataset(folder / "data")


def measure(folder: Path, precision: str, steps: int) -> dict:
    from tuner.core import hookimpl
    from tuner.core.config.build import build_config
    from tuner.core.host.manager import PluginHost
    from tuner.core.model.quantize import load_quantized, quantized_bytes
    from tuner.core.run.trainer import Trainer

    class QuantizeEverything:  # what the reference trainer does for Chroma
        @hookimpl(wrapper=True)
        def high_precision_modules(self):
            yield
            return []

    def settings(**extra):
        return {
            "pretrained_model_name_or_path": str(folder / "model"),
            "data_dir": str(folder / "data"),
            "cache_dir": str(folder / "cache"),
            "output_dir": str(folder / f"out-{precision}"),
            "resolution": 256,
            "tokenizer_max_length": 32,
            "network_rank": 16,
            "train_batch_size": 1,
            "mixed_precision": "no",
            "gradient_checkpointing": False,
            "base_model_precision": precision,
            "seed": 0,
            **extra,
        }

    host = PluginHost("chroma")
    config = build_config(host, settings(), "benchmark", warn=lambda m: None)
    result: dict = {"precision": precision}

    # 1. bytes and peak RSS (bf16 like a GPU run). Imports and the backend's first use (native
    # libraries load lazily) happen before the peak is reset: only the model's loading is measured.
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401

    if precision != "no_change":
        warm = torch.nn.Sequential(torch.nn.Linear(256, 256)).to(torch.bfloat16)
        host.precisions[precision].quantize(warm, "", [])
        warm(torch.randn(1, 256, dtype=torch.bfloat16))
        del warm
    from tuner.core.model.quantize import release_freed_memory

    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kib("VmRSS")
    if precision == "no_change":
        model = host.provide("load_model", config=config, component="transformer", dtype=torch.bfloat16)
    else:
        model = load_quantized(host, config, torch.bfloat16)
    peak = rss_kib("VmHWM")
    result["bytes"] = quantized_bytes(model, host.precisions.get(precision))
    result["params"] = sum(p.numel() for p in model.parameters())
    result["peak_growth_bytes"] = (peak - before) * 1024
    block = max(
        (m for n, m in model.named_modules() if n.count(".") == 1 and "blocks" in n),
        key=lambda m: sum(p.numel() for p in m.parameters()),
    )
    result["largest_block_bf16_bytes"] = (
        2 * sum(p.numel() for p in block.parameters()) if precision == "no_change" else 0
    )
    del model

    # 2. output error against fp32, with the family's exclusions and with everything quantized
    fp32 = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 256, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 32, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(256, 3),
        txt_ids=torch.zeros(32, 3),
        return_dict=False,
    )
    with torch.no_grad():
        reference = fp32(**inputs)[0]
        del fp32
        for label, extra in (("error", ()), ("error_everything", (("everything", QuantizeEverything()),))):
            if precision == "no_change":
                result[label] = 0.0
                continue
            h = PluginHost("chroma", extra_plugins=extra)
            model = load_quantized(h, build_config(h, settings(), "benchmark", warn=lambda m: None), torch.float32)
            out = model(**inputs)[0]
            result[label] = float((out - reference).norm() / reference.norm())
            del model

    # 3. training step time (fp32 compute on the CPU), from the run's own log
    trainer = Trainer(
        host, build_config(host, settings(max_train_steps=steps + 2), "b", warn=lambda m: None), warn=lambda m: None
    )
    start = time.perf_counter()
    trainer.train()
    rows = [json.loads(line) for line in (folder / f"out-{precision}" / "train_log.jsonl").read_text().splitlines()]
    result["step_s"] = (rows[-1]["elapsed_s"] - rows[1]["elapsed_s"]) / (len(rows) - 2)
    result["run_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(Path(args.folder), args.one, args.steps)))
        return
    folder = Path(tempfile.mkdtemp(prefix="tuner-quant-bench-"))
    build(folder)
    rows = []
    for precision in PRECISIONS:
        out = subprocess.run(
            [sys.executable, __file__, "--one", precision, "--folder", str(folder), "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(
        f"mid-size Chroma, {base['params'] / 1e6:.0f}M parameters; bytes relative to bf16 "
        f"({base['bytes'] / 2**20:.0f} MiB); peak = RSS growth while loading+quantizing / model bytes "
        f"(one bf16 block in flight: the largest is {base['largest_block_bf16_bytes'] / 2**20:.0f} MiB); "
        "error = ||out - fp32|| / ||fp32||; step = LoRA step time / unquantized (fp32 compute, CPU)"
    )
    print(
        "| precision | bytes vs bf16 | peak RSS / model | error (family exclusions) | error (all quantized) | step vs none |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['precision']} | {r['bytes'] / base['bytes']:.3f} | {r['peak_growth_bytes'] / r['bytes']:.2f} | "
            f"{r['error']:.4f} | {r['error_everything']:.4f} | {r['step_s'] / base['step_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
