"""Length bucketing: batches of similar length, so little of a batch is padding.

:class:`BucketSampler` shuffles the examples, cuts them into pools of ``pool`` batches, sorts each
pool by length, cuts it into batches and shuffles the batches. Every example is seen once per epoch;
a batch's examples come from one pool, so the order stays random at the scale of the pool.

Under DDP it shards itself (it is a ``DistributedSampler``, so Lightning does not wrap it): buckets
are cut at the global batch size and dealt out round-robin, so each step's global batch holds the
same examples as one process with the whole batch. The order depends on ``seed`` and the epoch
given to :meth:`set_epoch` (Lightning calls it every epoch), so a resumed run sees the same order.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DistributedSampler


class BucketSampler(DistributedSampler):
    """Args: ``lengths`` per example; ``batch_size`` per process; ``num_replicas`` and ``rank`` of this
    process (1 and 0 without DDP)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, pool: int = 50,
                 num_replicas: int = 1, rank: int = 0):
        # DistributedSampler.__init__ wants a dataset and a process group; its state is set here instead
        self.lengths, self.batch_size, self.seed, self.pool = list(lengths), batch_size * num_replicas, seed, pool
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.num_replicas)

    def __iter__(self):
        order = self._order()
        order += order[: len(self) * self.num_replicas - len(order)]  # every process gets as many
        return iter(order[self.rank::self.num_replicas])

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # only the last pool can end in a short batch; it stays last so the loader's batches line up with these
        last = batches.pop() if batches and len(batches[-1]) < self.batch_size else []
        return [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]] + last


def by_length(lengths: list[int]) -> list[int]:
    """Evaluation order: longest first, so the first batch shows the peak memory at once."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])
