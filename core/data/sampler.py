"""The order of training data: a pure function of (seed, micro-step), so a resumed run continues
exactly as an uninterrupted one and N processes see what one process with N times the batch sees.

:class:`BucketBatches` orders one dataset's images in aspect-ratio buckets (each global batch from
one bucket); :class:`DatasetBatches` draws each global batch's dataset by weight and tags indices
with their epoch (for per-epoch random crops).
"""

from __future__ import annotations

from typing import Any

import torch

from tuner.core.config.datasets import choose as choose_dataset


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, micro-step, rank, a purpose tag, ...): every random draw
    of a run is seeded from where it happens, never from what ran before."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 1_000_003 + int(part) + 0x632BE59BD9B4E019) % (1 << 63)
    return value


class BucketBatches(torch.utils.data.Sampler):
    """Endless batches of dataset indices for one process, each global batch from one bucket.

    Epoch e: each bucket's indices in a permutation seeded by (seed, e, bucket), cut into global
    batches of ``local_batch * processes`` (the last one filled up from the start of the same
    permutation, so every image is seen every epoch), and the epoch's batches in an order seeded
    by (seed, e). Global batch k is batch ``k % per_epoch`` of epoch ``k // per_epoch``; process r
    takes its slice. A sampler starting at k yields what an uninterrupted one would from k on.
    """

    def __init__(self, buckets: list[Any], local_batch: int, processes: int, rank: int, seed: int, start: int):
        self.local, self.rank, self.seed, self.start = local_batch, rank, seed, start
        self.global_batch = local_batch * processes
        groups: dict[Any, list[int]] = {}
        for index, bucket in enumerate(buckets):
            groups.setdefault(bucket, []).append(index)
        self.groups = [groups[b] for b in sorted(groups, key=lambda b: (b.aspect, b.width))]
        self.per_epoch = sum(-(-len(g) // self.global_batch) for g in self.groups)
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        batches = []
        for number, group in enumerate(self.groups):
            generator = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0xDA7A, number))
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            count = -(-len(order) // self.global_batch)
            order += order[: count * self.global_batch - len(order)]  # fill the last batch up
            batches += [order[j * self.global_batch : (j + 1) * self.global_batch] for j in range(count)]
        generator = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0xBA7C))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def indices(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[j][self.rank * self.local : (self.rank + 1) * self.local]

    def __iter__(self):
        k = self.start
        while True:
            yield self.indices(k)
            k += 1


class DatasetBatches(torch.utils.data.Sampler):
    """Endless batches over several datasets: global batch k comes from the dataset drawn by weight
    from a hash of (seed, k) (:func:`tuner.core.config.datasets.choose`), and is that dataset's next
    batch from its own :class:`BucketBatches`. A sampler starting at k replays the draws before k
    (cheap: one hash each) and yields what an uninterrupted one would. One dataset: its batches."""

    def __init__(
        self,
        datasets: list[int],
        buckets: list[Any],
        weights: list[float],
        local_batch: int,
        processes: int,
        rank: int,
        seed: int,
        start: int,
    ):
        self.weights, self.seed, self.start = weights, seed, start
        self.size = len(datasets)
        self.members = [[i for i, d in enumerate(datasets) if d == number] for number in range(len(weights))]
        self.samplers = [
            BucketBatches(
                [buckets[i] for i in members],
                local_batch,
                processes,
                rank,
                seed if number == 0 else step_seed(seed, number, 0xDA7A5E7),
                0,
            )
            for number, members in enumerate(self.members)
        ]

    def __iter__(self):
        taken = [0] * len(self.weights)
        if len(self.weights) == 1:
            taken[0] = self.start
        else:
            for k in range(self.start):
                taken[choose_dataset(self.seed, k, self.weights)] += 1
        k = self.start
        while True:
            number = choose_dataset(self.seed, k, self.weights)
            epoch = taken[number] // self.samplers[number].per_epoch  # which random crop (CachedDataset)
            batch = self.samplers[number].indices(taken[number])
            yield [self.members[number][i] + epoch * self.size for i in batch]
            taken[number] += 1
            k += 1
