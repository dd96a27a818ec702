"""What the shared cast of an fp32 residual stream buys (``runtime.SharedCast``), timed in pairs.

    python benchmarks/shared_cast.py --task sst2 --batch-size 16 --pairs 20 --out benchmarks/results/shared_cast_sst2.json

On this VM a throughput drifts by 5-15% from one minute to the next, more than the few percent
measured here, so one module per method is built as ``setup`` builds it under ``bf16-mixed``
(bf16 weights, fp32 stream) and timed with the sharing switched on and off step by step, in
ABBA order (on, off, off, on, ...): ``--pairs`` train steps and forwards of each. Reports per
method the medians, the median of the paired ratios (per-projection casts over shared), and
each setting's train/forward ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from datamodules import DATAMODULES
from prompt_methods import runtime
from tasks.spec import load_task

from step_speed import METHODS  # noqa: E402  (run from the repository root: python benchmarks/shared_cast.py)


def build(method: str, verbalizer, batch: dict):
    cls, kwargs = METHODS[method]
    model = cls(backbone="smollm2-135m", verbalizer=verbalizer, **kwargs)
    model.configure_trainable()
    model.cast_backbone(torch.bfloat16)
    model.choose_residual_stream(torch.bfloat16, "bf16-mixed")
    model.backbone.set_attn_implementation(runtime.attention("auto", "cpu", model.kind))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def train_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.loss(batch)

    return model, train_step, forward


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--methods", nargs="+", default=["soft_prompt", "prefix_tuning", "p_tuning"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/shared_cast.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = DATAMODULES[load_task(args.task).family](task=args.task, max_train_samples=args.batch_size,
                                                  batch_size=args.batch_size, max_length=args.max_length)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    rows = []
    for method in args.methods:
        model, train_step, forward = build(method, dm.verbalizer, batch)
        assert model._shared_cast is not None

        def switch(on: bool):
            if on and model._shared_cast is None:
                model._shared_cast = runtime.SharedCast(model.backbone)
            elif not on and model._shared_cast is not None:
                model._shared_cast.remove()
                model._shared_cast = None

        times = {on: {"train": [], "forward": []} for on in (True, False)}
        for on in (True, False):  # warm-up: first calls pick kernels
            switch(on)
            train_step(), forward()
        for i in range(args.pairs):
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                switch(on)
                times[on]["train"].append(timed(train_step))
                times[on]["forward"].append(timed(forward))
        med = {on: {k: statistics.median(v) for k, v in t.items()} for on, t in times.items()}
        ratio = {k: statistics.median(off / on for on, off in zip(times[True][k], times[False][k]))
                 for k in ("train", "forward")}
        row = {"task": args.task, "method": method, "batch": args.batch_size, "seq_len": int(batch["input_ids"].shape[1]),
               "pairs": args.pairs,
               "shared": {"train_s": round(med[True]["train"], 4), "forward_s": round(med[True]["forward"], 4),
                          "train_over_forward": round(med[True]["train"] / med[True]["forward"], 3)},
               "per_projection": {"train_s": round(med[False]["train"], 4), "forward_s": round(med[False]["forward"], 4),
                                  "train_over_forward": round(med[False]["train"] / med[False]["forward"], 3)},
               "train_speedup_paired": round(ratio["train"], 3), "forward_speedup_paired": round(ratio["forward"], 3),
               "times": {("shared" if on else "per_projection"): {k: [round(x, 4) for x in v] for k, v in t.items()}
                         for on, t in times.items()}}
        print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
