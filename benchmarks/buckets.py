"""Caching and one training epoch over a few hundred mixed-aspect images, in aspect-ratio buckets.

    OMP_NUM_THREADS=1 python benchmarks/buckets.py [--images 300] [--resolution 256]

The benchmark draws its own images (phone portraits, 16:9 and 4:3 landscapes, squares, 2:1 and
1:2, and a few 10:1 panoramas, 300-900 px on the long side) with captions, then on the tiny
Chroma: the cold cache build (every image sized from its header, bucketed, decoded, resized,
cropped and encoded; every caption encoded), the warm preparation (headers read, every entry
found), and one epoch of training with warm caches. Times are per image.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

SHAPES = [(3, 4), (4, 3), (16, 9), (9, 16), (1, 1), (2, 1), (1, 2), (10, 1)]
WEIGHTS = [4, 2, 3, 2, 4, 1, 1, 0.3]


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for index in range(count):
        aspect_w, aspect_h = rng.choices(SHAPES, WEIGHTS)[0]
        longer = rng.randint(300, 900)
        scale = longer / max(aspect_w, aspect_h)
        size = (max(8, round(aspect_w * scale)), max(8, round(aspect_h * scale)))
        image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
        pen = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.randint(0, size[0] - 1), rng.randint(0, size[1] - 1)
            pen.ellipse((x, y, x + size[0] // 4, y + size[1] // 4), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        image.save(folder / f"{index:04d}.jpg", quality=90)
        (folder / f"{index:04d}.txt").write_text(f"picture {index % 17} of a {aspect_w}:{aspect_h} scene")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    import torch

    from tuner.core.config.build import build_config
    from tuner.core.data.cache import prepare_caches
    from tuner.core.data.images import scan_dataset
    from tuner.core.host.manager import PluginHost
    from tuner.core.run.trainer import Trainer
    from tuner.plugins.chroma.tiny import build_tiny_chroma

    tmp = Path(tempfile.mkdtemp(prefix="tuner-bucket-bench-"))
    model = build_tiny_chroma(tmp / "model")
    make_images(tmp / "data", args.images)
    settings = {
        "pretrained_model_name_or_path": str(model),
        "data_dir": str(tmp / "data"),
        "cache_dir": str(tmp / "cache"),
        "output_dir": str(tmp / "out"),
        "resolution": args.resolution,
        "aspect_bucket_alignment": 32,
        "tokenizer_max_length": 32,
        "train_batch_size": 4,
        "mixed_precision": "no",
        "report_to": "none",
        "gradient_checkpointing": False,
    }
    host = PluginHost("chroma")
    config = build_config(host, settings, "bench", warn=lambda m: None)
    items = scan_dataset(config.data_dir, lambda m: None)
    timings = {}
    for label in ("cold cache build", "warm preparation"):
        start = time.perf_counter()
        prepared = prepare_caches(host, config, items, [], torch.device("cpu"), torch.float32, lambda m: None, 4)
        timings[label] = time.perf_counter() - start
    print(prepared.plan.table())
    from tuner.core.data.sampler import BucketBatches

    epoch = BucketBatches([e.bucket for e in prepared.entries], 4, 1, 0, 0, 0).per_epoch
    config = build_config(host, {**settings, "max_train_steps": epoch}, "bench", warn=lambda m: None)
    start = time.perf_counter()
    Trainer(host, config, warn=lambda m: None).train()
    timings[f"one warm epoch ({epoch} steps of 4, training included)"] = time.perf_counter() - start
    print(f"{args.images} images at resolution {args.resolution}, torch threads {torch.get_num_threads()}")
    for label, seconds in timings.items():
        print(f"{label}: {seconds:.2f} s, {1000 * seconds / args.images:.2f} ms per image")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
