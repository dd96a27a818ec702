"""Length bucketing: every example once per epoch, batches of similar length, deterministic per seed."""

from __future__ import annotations

import random

from datamodules.sampling import BucketSampler, by_length


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
    assert first == list(b)  # same seed, same order
    assert list(a) != first  # next epoch, new order
    second = list(b)  # b's second epoch
    c = BucketSampler(lengths, 4, seed=3)
    c.set_epoch(1)  # what Lightning's distributed wrapper calls
    assert list(c) == second


def test_eval_order_longest_first():
    assert by_length([3, 9, 1, 9]) == [1, 3, 0, 2]


def test_datamodule_buckets_training_and_sorts_eval(make_data, tiny):
    dm = make_data(tiny("llama"), batch_size=2, eval_batch_size=2)
    lengths = [int(b["attention_mask"].sum(1).max()) for b in dm.test_dataloader()]
    assert lengths == sorted(lengths, reverse=True)
    seen = sorted(i for b in dm.train_dataloader() for i in b["ids"])
    assert seen == sorted(it["id"] for it in dm.datasets["train"])
    ids = [i for b in dm.predict_dataloader() for i in b["ids"]]
    assert ids == [it["id"] for it in dm.datasets["predict"]]  # predict keeps the file order
