"""Aspect-ratio buckets: every image trains near its own shape instead of a centre square.

A bucket is a ``width x height`` in pixels, both multiples of ``aspect_bucket_alignment``. With
``resolution_type: area`` (the default) the buckets hold ``resolution**2`` pixels within 25%; with
``pixel`` their shorter side is ``resolution``. Their aspect ratio stays within
``aspect_bucket_max_ratio`` (and its inverse). An image goes to the bucket whose aspect ratio is
closest to its own (in log space, so 2:1 and 1:2 are equally far from 1:1), is resized to cover
it and cropped by the remainder only: never stretched. A panorama wider than the widest bucket
goes there and loses its sides.

Every batch comes from one bucket. A bucket holding fewer images than one global batch is merged
into the nearest populated bucket (its images are cropped to that shape), so no image is dropped;
within an epoch a bucket's last batch is filled up from the start of its own shuffled order, so
every image is seen every epoch and every batch has the same size.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def bucket_sizes(resolution: int, resolution_type: str, alignment: int, max_ratio: float) -> list[Bucket]:
    """Every bucket of a run, sorted by aspect ratio (tallest first)."""
    side = max(alignment, round(resolution / alignment) * alignment)
    limit = max_ratio * (1 + 1e-9)
    found = {(side, side)}
    if resolution_type == "pixel":  # the shorter side is the resolution
        longer = side + alignment
        while longer / side <= limit:
            found |= {(longer, side), (side, longer)}
            longer += alignment
    else:  # about resolution**2 pixels: for each width (and each height) the other side that keeps the area
        area = side * side
        step = alignment
        while step <= side * limit:
            other = max(alignment, round(area / step / alignment) * alignment)
            # a coarse alignment at a small resolution cannot keep the area: such sizes are left out
            if max(step, other) / min(step, other) <= limit and 0.8 <= step * other / area <= 1.25:
                found |= {(step, other), (other, step)}
            step += alignment
    return sorted((Bucket(w, h) for w, h in found), key=lambda b: (b.aspect, b.width))


def nearest(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to ``width / height`` (ties: the larger one)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - aspect), -b.width * b.height))


@dataclass
class BucketPlan:
    """Which bucket each image trains in, and what was merged."""

    buckets: list[Bucket]  # per image, in the order given
    merged: dict[Bucket, Bucket]  # a bucket too small for a batch -> where its images went

    def counts(self) -> Counter:
        return Counter(self.buckets)

    def table(self) -> str:
        """One line per bucket in use: its size and image count, and what was merged into it."""
        counts = self.counts()
        into: dict[Bucket, list[Bucket]] = {}
        for small, big in self.merged.items():
            into.setdefault(big, []).append(small)
        lines = [f"{len(counts)} bucket(s) for {sum(counts.values())} image(s):"]
        for bucket in sorted(counts, key=lambda b: (b.aspect, b.width)):
            merged = into.get(bucket)
            note = f"  (with the images of {', '.join(map(str, sorted(merged)))})" if merged else ""
            lines.append(f"  {str(bucket):>11}  {counts[bucket]:>6} image(s){note}")
        return "\n".join(lines)


def plan(sizes: list[tuple[int, int]], buckets: list[Bucket], global_batch: int) -> BucketPlan:
    """Assign each ``(width, height)`` to its nearest bucket; merge buckets with fewer images than
    ``global_batch`` into the nearest populated one until every bucket fills a batch."""
    assigned = [nearest(w, h, buckets) for w, h in sizes]
    merged: dict[Bucket, Bucket] = {}
    while True:
        counts = Counter(assigned)
        small = [b for b in counts if counts[b] < global_batch]
        if not small or len(counts) == 1:
            break
        smallest = min(small, key=lambda b: (counts[b], b.aspect, b.width))
        others = [b for b in counts if b != smallest]
        target = min(others, key=lambda b: (abs(math.log(b.aspect) - math.log(smallest.aspect)), -counts[b], b.aspect))
        assigned = [target if b == smallest else b for b in assigned]
        merged = {k: (target if v == smallest else v) for k, v in merged.items()}
        merged[smallest] = target
    return BucketPlan(assigned, merged)


def crop_box(width: int, height: int, bucket: Bucket, style: str, offset: float = 0.5) -> tuple[int, int, int, int]:
    """The scale-to-cover size and crop box of a ``width x height`` image in ``bucket``: returns
    ``(scaled_width, scaled_height, left, top)``. ``offset`` in [0, 1] places the crop along the
    axis that has a remainder (0.5: centred; a random crop draws it)."""
    scale = max(bucket.width / width, bucket.height / height)
    scaled_w = max(bucket.width, round(width * scale))
    scaled_h = max(bucket.height, round(height * scale))
    position = 0.5 if style == "center" else offset
    return scaled_w, scaled_h, int((scaled_w - bucket.width) * position), int((scaled_h - bucket.height) * position)
