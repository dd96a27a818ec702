"""Greedy answers with and without stopping at a line break that follows text (``Generator``'s
``line_ends``), on the packaged SmolLM2 zero-shot (the template alone) and SQuAD test questions.

    python benchmarks/generation_stop.py --questions 64 --out benchmarks/results/generation_stop.json

Both passes must give the same answer strings; the file records the seconds each took.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import islice
from pathlib import Path

import torch

from datamodules import QuestionAnsweringDataModule
from prompt_methods import HardPrompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/generation_stop.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dm = QuestionAnsweringDataModule(task="squad", eval_batch_size=args.batch_size, max_eval_samples=args.questions)
    dm.setup("test")
    batches = list(islice(dm.test_dataloader(), -(-args.questions // args.batch_size)))
    model = HardPrompt(backbone="smollm2-135m", verbalizer=dm.verbalizer).eval()
    model.cast_backbone(torch.bfloat16)
    model.choose_residual_stream(torch.bfloat16, "bf16-mixed")
    model.backbone.set_attn_implementation("grouped")
    row = {"questions": sum(len(b["ids"]) for b in batches), "batch_size": args.batch_size,
           "max_new_tokens": model.readout.max_new_tokens}
    answers = {}
    for line_ends in (False, True, False, True):  # interleaved, twice
        model.readout.line_ends = line_ends
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = [a for b in batches for a in model.answer_texts(b)]
        row.setdefault(f"seconds_line_ends_{str(line_ends).lower()}", []).append(round(time.perf_counter() - start, 2))
        answers.setdefault(line_ends, got)
    row["same_answers"] = answers[True] == answers[False]
    row["examples"] = answers[True][:5]
    print(json.dumps(row, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
