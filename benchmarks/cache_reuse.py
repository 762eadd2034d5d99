"""One epoch with cold caches against the same epoch with warm caches, in one process.

    OMP_NUM_THREADS=1 python benchmarks/cache_reuse.py [--images 48]

The cold run loads the VAE and the text encoder and encodes every image and caption; the warm
run finds every entry and loads no encoder. Both train the same steps on the tiny Chroma.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    from tuner.core.config.build import build_config
    from tuner.core.host.manager import PluginHost
    from tuner.core.run.trainer import Trainer
    from tuner.plugins.chroma.tiny import build_tiny_chroma
    from tuner.testing import shapes_dataset

    tmp = Path(tempfile.mkdtemp(prefix="tuner-cache-bench-"))
    model = build_tiny_chroma(tmp / "model")
    data = tmp / "data"
    for copy in range(max(1, args.images // 12)):  # the 12 shapes, several times (distinct files)
        shapes_dataset(data / f"set{copy}", size=args.resolution)
    images = len(list(data.rglob("*.png")))
    settings = {
        "pretrained_model_name_or_path": str(model),
        "data_dir": str(data),
        "cache_dir": str(tmp / "cache"),
        "resolution": args.resolution,
        "tokenizer_max_length": 32,
        "train_batch_size": 4,
        "max_train_steps": images // 4,
        "mixed_precision": "no",
        "report_to": "none",
        "gradient_checkpointing": False,
    }
    host = PluginHost("chroma")
    timings = []
    for label in ("cold", "warm"):
        config = build_config(host, {**settings, "output_dir": str(tmp / label)}, "bench", warn=lambda m: None)
        start = time.perf_counter()
        Trainer(host, config, warn=lambda m: None).train()
        timings.append(time.perf_counter() - start)
        print(f"{label}: one epoch of {images} images at {args.resolution}px in {timings[-1]:.2f} s")
    print(f"warm / cold: {timings[1] / timings[0]:.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
