"""How much of a training batch is padding, with and without length bucketing.

    python benchmarks/padding.py --tasks sst2 boolq squad --batch-size 8

Tokenizes each task's training split with the packaged SmolLM2 tokenizer and reports, over one
epoch, padded positions / all positions for random batches and for ``BucketSampler`` batches.
Compute per step scales with the padded length, so the ratio of the two is the saving.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from datamodules import DATAMODULES
from datamodules.sampling import BucketSampler
from tasks.spec import load_task


def waste(lengths: list[int], order: list[int], size: int) -> tuple[float, int]:
    padded = real = 0
    for i in range(0, len(order), size):
        batch = [lengths[j] for j in order[i:i + size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "boolq", "squad"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/padding.json")
    args = parser.parse_args()
    rows = []
    for task in args.tasks:
        spec = load_task(task)
        dm = DATAMODULES[spec.family](task=task, **({"max_length": 384} if task == "squad" else {}))
        dm.setup()
        lengths = [len(it["input_ids"]) for it in dm.datasets["train"]]
        shuffled = list(range(len(lengths)))
        random.Random(0).shuffle(shuffled)
        plain, plain_tokens = waste(lengths, shuffled, args.batch_size)
        bucketed, bucket_tokens = waste(lengths, list(BucketSampler(lengths, args.batch_size, seed=0)), args.batch_size)
        row = {"task": task, "examples": len(lengths), "batch_size": args.batch_size,
               "padding_random": round(plain, 4), "padding_bucketed": round(bucketed, 4),
               "positions_saved": round(1 - bucket_tokens / plain_tokens, 4)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
