"""The AdamW step alone, fused and unfused, over each method's trained parameters.

    python benchmarks/optimizer_step.py --out benchmarks/results/optimizer_step.json

Builds each method on the packaged SmolLM2 (fine-tuning trains all 134.5M parameters in fp32;
the prompt methods their prompt, prefix or encoder), gives every trained parameter a random
gradient, and times ``--steps`` optimizer steps of ``torch.optim.AdamW`` with ``fused=True``
(what :func:`prompt_methods.optim.adamw` picks) and without (torch's default on a CPU: a loop of
elementwise calls per parameter), alternating ``--rounds`` times and keeping each one's median
round. Also reports how far apart the two updates leave the parameters after the timed steps.

``--train-pairs N`` then times whole train steps (``step_speed.py``'s ``bf16-weights`` setup: a
tuned backbone keeps fp32 weights under bf16 autocast) of ``--train-methods`` on one ``--task``
batch, a module with each optimizer, alternating in ABBA order, and reports the median paired speed-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from datamodules import DATAMODULES
from tasks.spec import load_task

from step_speed import METHODS, build  # noqa: E402  (run from the repository root: python benchmarks/optimizer_step.py)


def train_pairs(method: str, task: str, batch_size: int, pairs: int) -> dict:
    """Train steps with the fused and the unfused AdamW, alternating (ABBA), on one batch."""
    dm = DATAMODULES[load_task(task).family](task=task, batch_size=batch_size, max_train_samples=batch_size)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    steps = {name: build(method, "bf16-weights", "grouped", batch, dm.verbalizer, fused=name == "fused")[0]
             for name in ("fused", "unfused")}
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for i in range(pairs):
        for name in (("fused", "unfused") if i % 2 == 0 else ("unfused", "fused")):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    paired = statistics.median(u / f for f, u in zip(times["fused"], times["unfused"]))
    return {"method": method, "task": task, "batch": batch_size, "seq_len": int(batch["input_ids"].shape[1]), "pairs": pairs,
            "train_fused_s": round(statistics.median(times["fused"]), 4),
            "train_unfused_s": round(statistics.median(times["unfused"]), 4), "train_speedup_paired": round(paired, 3),
            "times_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["soft_prompt", "prefix_tuning", "p_tuning", "fine_tuning"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-pairs", type=int, default=0)
    parser.add_argument("--train-methods", nargs="+", default=["fine_tuning", "hard_prompt"])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/optimizer_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods:
        cls, kwargs = METHODS[method]
        model = cls(backbone="smollm2-135m", verbalizer=[[[1]], [[2]]], **kwargs)
        model.configure_trainable()
        params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(0)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        twins = {"fused": params, "unfused": [copy.deepcopy(p) for p in params]}
        for original, twin in zip(params, twins["unfused"]):
            twin.grad = original.grad.clone()
        opts = {"fused": torch.optim.AdamW(twins["fused"], lr=1e-4, weight_decay=0.01, fused=True),
                "unfused": torch.optim.AdamW(twins["unfused"], lr=1e-4, weight_decay=0.01)}
        for opt in opts.values():  # first step: creates the moments
            opt.step()
        times = {name: [] for name in opts}
        for _ in range(args.rounds):
            for name, opt in opts.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    opt.step()
                times[name].append((time.perf_counter() - start) / args.steps)
        med = {name: statistics.median(t) for name, t in times.items()}
        diff = max(float((a - b).abs().max()) for a, b in zip(twins["fused"], twins["unfused"]))
        row = {"method": method, "trained_params": sum(p.numel() for p in params), "tensors": len(params),
               "fused_s": round(med["fused"], 5), "unfused_s": round(med["unfused"], 5),
               "speedup": round(med["unfused"] / med["fused"], 2), "max_param_diff": diff,
               "rounds_s": {name: [round(t, 5) for t in ts] for name, ts in times.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model, twins, opts
    train = []
    for method in args.train_methods if args.train_pairs else ():
        train.append(train_pairs(method, args.task, args.batch_size, args.train_pairs))
        print(json.dumps({k: v for k, v in train[-1].items() if k != "times_s"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "steps": args.steps,
                                          "rounds": args.rounds, "rows": rows, "train_steps": train}, indent=1))


if __name__ == "__main__":
    main()
