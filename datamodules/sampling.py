"""Length bucketing: batches of similar length, so little of a batch is padding.

:class:`BucketSampler` shuffles the examples, cuts them into pools of ``pool`` batches, sorts each
pool by length, cuts it into batches and shuffles the batches. Every example is seen once per epoch;
a batch's examples come from one pool, so the order stays random at the scale of the pool. It yields
indices (a plain sampler, not a batch sampler) so Lightning's distributed wrapper can shard it.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class BucketSampler(Sampler[int]):
    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, pool: int = 50):
        self.lengths, self.batch_size, self.seed, self.pool = list(lengths), batch_size, seed, pool
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # a new order next epoch even when nobody calls set_epoch
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # only the last pool can end in a short batch; it stays last so the loader's batches line up with these
        last = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        for b in torch.randperm(len(batches), generator=gen).tolist():
            yield from batches[b]
        if last:
            yield from last


def by_length(lengths: list[int]) -> list[int]:
    """Evaluation order: longest first, so the first batch shows the peak memory at once."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])
