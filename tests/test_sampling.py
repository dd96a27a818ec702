"""Length bucketing: every example once per epoch, batches of similar length, deterministic per seed."""

from __future__ import annotations

import random

import torch

from datamodules.sampling import BucketSampler, EvalSampler, by_length


def batches_of(sampler, size):
    order = list(sampler)
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_bucket_sampler_covers_every_example_once_in_homogeneous_batches():
    rng = random.Random(0)
    lengths = [rng.randint(3, 80) for _ in range(1003)]
    sampler = BucketSampler(lengths, batch_size=8, seed=1, pool=10)
    order = list(sampler)
    assert sorted(order) == list(range(1003))
    batches = batches_of(BucketSampler(lengths, 8, seed=1, pool=10), 8)
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 1003 % 8
    waste = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa: E731
    shuffled = list(range(1003))
    random.Random(1).shuffle(shuffled)
    plain = [shuffled[i:i + 8] for i in range(0, 1003, 8)]
    assert waste(batches) < 0.25 * waste(plain)  # padding falls by far more than 4x on uniform lengths


def test_bucket_sampler_is_seeded_and_changes_per_epoch():
    lengths = list(range(200))
    a, b = BucketSampler(lengths, 4, seed=3), BucketSampler(lengths, 4, seed=3)
    first = list(a)
    assert first == list(b) == list(a)  # same seed and epoch, same order
    a.set_epoch(1)  # what Lightning calls every epoch
    assert list(a) != first and sorted(a) == sorted(first)
    # another seed's epochs are not this seed's shifted by one (seed 3's second epoch is not seed 4's first)
    orders = {(seed, epoch): None for seed in (2, 3, 4) for epoch in range(3)}
    for seed, epoch in orders:
        sampler = BucketSampler(lengths, 4, seed=seed)
        sampler.set_epoch(epoch)
        orders[seed, epoch] = tuple(sampler)
    assert len(set(orders.values())) == len(orders)
    assert orders[3, 0] == tuple(first)  # a run's first epoch keeps the order it always had


def test_bucket_sampler_shards_global_batches_across_processes():
    lengths = [(i * 37) % 50 for i in range(23)]
    whole = list(BucketSampler(lengths, 4, seed=5))  # one process, batch 4
    shards = [list(BucketSampler(lengths, 2, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]  # 2 x batch 2
    assert len(shards[0]) == len(shards[1]) == 12  # padded to equal length
    for k in range(5):  # each step's global batch is the single process's batch
        step = shards[0][2 * k:2 * k + 2] + shards[1][2 * k:2 * k + 2]
        assert sorted(step) == sorted(whole[4 * k:4 * k + 4])


def test_eval_order_longest_first():
    assert by_length([3, 9, 1, 9]) == [1, 3, 0, 2]


def test_datamodule_buckets_training_and_sorts_eval(make_data, tiny):
    dm = make_data(tiny("llama"), batch_size=2, eval_batch_size=2)
    lengths = [int(b["attention_mask"].sum(1).max()) for b in dm.test_dataloader()]
    assert lengths == sorted(lengths, reverse=True)
    seen = sorted(i for b in dm.train_dataloader() for i in b["ids"])
    assert seen == sorted(it["id"] for it in dm.datasets["train"])
    from datamodules.sampling import BucketSampler

    assert isinstance(dm.train_dataloader().sampler, BucketSampler)  # bucket_by_length is on by default
    ids = [i for b in dm.predict_dataloader() for i in b["ids"]]
    assert ids == [it["id"] for it in dm.datasets["predict"]]  # predict keeps the file order


def test_eval_sampler_shards_without_repeats():
    """Every example once across the processes (Lightning's sampler would repeat one of 2,717 on 2);
    a split shorter than the process count gives an empty share the first example."""
    order = by_length([5, 1, 9, 3, 7])
    shares = [list(EvalSampler(order, 2, rank)) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(5)) and [len(s) for s in shares] == [3, 2]
    assert list(EvalSampler(order)) == order  # one process: the whole order
    assert [list(EvalSampler([4], 2, rank)) for rank in (0, 1)] == [[4], [4]]
    assert isinstance(EvalSampler(order, 2, 1), torch.utils.data.DistributedSampler)  # so Lightning does not wrap it
