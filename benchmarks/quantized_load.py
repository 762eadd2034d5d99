"""Streaming a quantized denoiser block by block against quantizing it in one go, side by side.

    OMP_NUM_THREADS=1 python benchmarks/quantized_load.py [--precisions int8-quanto nf4-bnb]

The model is a Chroma of the real depth (19 double and 38 single blocks, the real config from
``examples/models/chroma1-configs``) made narrow (60M parameters), saved in bf16. For each
precision, in a process of its own (so peak RSS is its own):

- **tuner**: ``load_quantized`` (meta model, each block read from the safetensors files and
  quantized before the next is read), bf16;
- **one call**: the unquantized model loaded whole (``from_pretrained``, bf16), then quantized by
  the library in one call over the whole model (optimum-quanto's ``quantize`` + ``freeze``;
  bitsandbytes through the plugin's own function on the whole model), the library's best case.

Prints one JSON row per precision: seconds for each (the median of ``--repeats`` processes, run
alternately), their ratio (goal: at most 1.5), and peak RSS
growth of each relative to the quantized model's bytes (tuner's should stay near 1: the quantized
model plus about one block in flight).
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

REPO = Path(__file__).resolve().parents[1]
NARROW = dict(attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256, approximator_hidden_dim=256)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def build(folder: Path, width: int = 64) -> None:
    from diffusers import ChromaTransformer2DModel

    from tuner.plugins.chroma.tiny import build_tiny_chroma

    build_tiny_chroma(folder, seed=0)
    real = json.loads((REPO / "examples/models/chroma1-configs/transformer/config.json").read_text())
    config = {k: v for k, v in {**real, **NARROW, "attention_head_dim": width}.items() if not k.startswith("_")}
    config["axes_dims_rope"] = [width // 4, 3 * width // 8, 3 * width // 8]  # sums to the head dim
    torch.manual_seed(0)
    model = ChromaTransformer2DModel.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder / "transformer")


def measure(folder: Path, precision: str, way: str) -> dict:
    from tuner.core.config.build import build_config
    from tuner.core.host.manager import PluginHost
    from tuner.core.model.quantize import load_quantized, quantized_bytes, release_freed_memory

    host = PluginHost("chroma")
    settings = {
        "pretrained_model_name_or_path": str(folder),
        "base_model_precision": precision,
        "mixed_precision": "bf16",
    }
    config = build_config(host, settings, "benchmark", warn=lambda m: None)
    info = host.precisions[precision]
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401

    warm = torch.nn.Sequential(torch.nn.Linear(256, 256)).to(torch.bfloat16)  # the backend's native code loads lazily
    info.quantize(warm, "", [])
    del warm
    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kib("VmRSS")
    started = time.perf_counter()
    if way == "tuner":
        model = load_quantized(host, config, torch.bfloat16)
    else:
        model = host.provide("load_model", config=config, component="transformer", dtype=torch.bfloat16)
        keep = list(host.hook.high_precision_modules(transformer=model, config=config) or [])
        if precision.endswith("-quanto"):
            import optimum.quanto as quanto

            qtype = getattr(quanto, "qint8" if precision == "int8-quanto" else "qint4")
            quanto.quantize(model, weights=qtype, exclude=[f"{k}*" for k in keep] or None)
            quanto.freeze(model)
        else:
            info.quantize(model, "", keep)
        model.requires_grad_(False)
    seconds = time.perf_counter() - started
    peak = rss_kib("VmHWM")
    stored = quantized_bytes(model, info)
    return {
        "seconds": round(seconds, 3),
        "peak_growth_over_model": round((peak - before) * 1024 / stored, 2),
        "model_bytes": stored,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["int8-quanto", "int4-quanto", "nf4-bnb"])
    parser.add_argument("--repeats", type=int, default=3, help="processes per way; the median is reported")
    parser.add_argument("--head-dim", type=int, default=64, help="64: 60M parameters; 128: 240M")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "PRECISION", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1], args.child[2])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build(folder, args.head_dim)
        for precision in args.precisions:
            row = {"precision": precision}
            runs: dict[str, list[dict]] = {"tuner": [], "one_call": []}
            for _ in range(args.repeats):  # alternated, each in a fresh process; the median is reported
                for way in runs:
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", str(folder), precision, way],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    runs[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
            for way, measured in runs.items():
                row[way] = sorted(measured, key=lambda m: m["seconds"])[len(measured) // 2]
                row[way]["all_seconds"] = [m["seconds"] for m in measured]
            row["tuner_over_one_call"] = round(row["tuner"]["seconds"] / row["one_call"]["seconds"], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
