"""Shared-prompt vs naive per-label scoring of multi-token label words, on the packaged SmolLM2.

    python benchmarks/label_scoring.py --task semeval --batches 3 --out benchmarks/results/label_scoring.json

Shared: the prompt is encoded once and every label continuation is scored against its cache in
one batched pass. Naive: the whole prompt is run again for every label word.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from datamodules import RelationExtractionDataModule
from prompt_methods import HardPrompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="semeval")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/label_scoring.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = RelationExtractionDataModule(task=args.task, eval_batch_size=args.batch_size,
                                      max_eval_samples=args.batch_size * args.batches, max_train_samples=16)
    dm.setup()
    model = HardPrompt(verbalizer=dm.verbalizer, labels=dm.labels)
    model.configure_trainable()
    model.cast_backbone(torch.bfloat16)
    model.backbone.set_attn_implementation("eager")
    model.eval()
    batches = list(dm.val_dataloader())
    timings, max_diff = {"shared": 0.0, "naive": 0.0}, 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(batches[0])  # warm-up
        for batch in batches:
            start = time.perf_counter()
            shared = model(batch)
            timings["shared"] += time.perf_counter() - start
            start = time.perf_counter()
            naive = model.readout.naive(model.backbone, lambda: model.feed(batch))
            timings["naive"] += time.perf_counter() - start
            max_diff = max(max_diff, (shared - naive).abs().max().item())
            agree = (shared.argmax(-1) == naive.argmax(-1)).float().mean().item()
    n = sum(len(b["labels"]) for b in batches)
    words = sum(len(w) for w in dm.verbalizer)
    row = {"task": args.task, "labels": len(dm.labels), "words": words,
           "max_word_tokens": max(len(t) for w in dm.verbalizer for t in w), "examples": n,
           "shared_samples_per_s": round(n / timings["shared"], 2), "naive_samples_per_s": round(n / timings["naive"], 2),
           "speedup": round(timings["naive"] / timings["shared"], 2), "max_abs_diff_bf16": round(max_diff, 4),
           "argmax_agreement_last_batch": agree}
    print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
