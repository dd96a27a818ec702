"""Length bucketing: batches of similar length, so little of a batch is padding.

:class:`BucketSampler` shuffles the examples, cuts them into pools of ``pool`` batches, sorts each
pool by length, cuts it into batches and shuffles the batches. Every example is seen once per epoch;
a batch's examples come from one pool, so the order stays random at the scale of the pool.

Under DDP it shards itself (it is a ``DistributedSampler``, so Lightning does not wrap it): buckets
are cut at the global batch size and dealt out round-robin, so each step's global batch holds the
same examples as one process with the whole batch. The order depends on ``seed`` and the epoch
given to :meth:`set_epoch` (Lightning calls it every epoch), so a resumed run sees the same order.

:class:`ResumableLoader` makes that exact mid-epoch too: Lightning stores its ``state_dict`` (the
batches of the current epoch already trained on) in every checkpoint and hands it back on resume,
and the sampler then starts after those batches instead of replaying the epoch from its start.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
from torch.utils.data import DataLoader, DistributedSampler


class BucketSampler(DistributedSampler):
    """Args: ``lengths`` per example; ``batch_size`` per process; ``num_replicas`` and ``rank`` of this
    process (1 and 0 without DDP)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, pool: int = 50,
                 num_replicas: int = 1, rank: int = 0):
        # DistributedSampler.__init__ wants a dataset and a process group; its state is set here instead
        self.lengths, self.batch_size, self.seed, self.pool = list(lengths), batch_size * num_replicas, seed, pool
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, batches: int) -> None:
        """Start the next epoch's iteration after its first ``batches`` batches (a mid-epoch resume)."""
        self._skip = batches

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.num_replicas)

    def __iter__(self):
        order = self._order()
        order += order[: len(self) * self.num_replicas - len(order)]  # every process gets as many
        start, self._skip = self._skip * (self.batch_size // self.num_replicas), 0
        return iter(order[self.rank::self.num_replicas][start:])

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        size = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # only the last pool can end in a short batch; it stays last so the loader's batches line up with these
        last = batches.pop() if batches and len(batches[-1]) < self.batch_size else []
        return [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]] + last


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of an epoch: ``seed`` itself for the first, then a hash of both. Not
    ``seed + epoch``, under which seed 42's second epoch is seed 43's first, so runs over several seeds
    share their orders, one epoch apart."""
    if epoch == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


class ResumableLoader(DataLoader):
    """The training DataLoader over a :class:`BucketSampler`, checkpointed by Lightning mid-epoch.

    ``batches_done`` returns how many batches of the current epoch have been trained on (the
    DataModule reads it from the trainer's loop progress); it is the whole state. Loading a state
    from the middle of an epoch makes the sampler skip those batches once; a state saved at an
    epoch's end skips nothing (Lightning starts the next epoch).
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict:
        return {"batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict) -> None:
        done = int(state.get("batches_done", 0))
        if 0 < done < len(self) and isinstance(self.sampler, BucketSampler):
            self.sampler.skip_batches(done)


def by_length(lengths: list[int]) -> list[int]:
    """Evaluation order: longest first, so the first batch shows the peak memory at once."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


class EvalSampler(DistributedSampler):
    """An evaluation order, sharded over ``num_replicas`` processes without repeats: process ``rank``
    takes every ``num_replicas``-th example from its rank on. Lightning's own distributed sampler pads
    a split whose length does not divide by the process count with repeated examples, which every
    gathered score would then count twice. Shares differ by at most one example (evaluation has no
    gradient to synchronise per step). Only a split shorter than the process count repeats: a
    process whose share would be empty gets the order's first example, as it must still run the
    epoch's hooks and their collectives."""

    def __init__(self, order: list[int], num_replicas: int = 1, rank: int = 0):
        # as BucketSampler: a DistributedSampler so that Lightning does not wrap it; state set here
        self.order, self.num_replicas, self.rank, self.epoch = list(order), num_replicas, rank, 0

    def _mine(self) -> list[int]:
        return self.order[self.rank::self.num_replicas] or self.order[:1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self):
        return iter(self._mine())
