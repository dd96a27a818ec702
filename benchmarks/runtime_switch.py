"""What one of promptlit's exact runtime shortcuts buys, timed in pairs with it switched on and off:

- ``--switch trim_tail``: the last layer's MLP and output projection run only where the answer is
  read (``runtime.last_layer_reads``; settings ``trimmed``/``whole``);
- ``--switch fuse_norms``: the RMSNorms run through ``runtime.fuse_norms``'s closed-form backward
  (settings ``fused``/``own``);
- ``--switch pack_linears``: frozen linear layers run on oneDNN's packed weights (``runtime.pack_linears``;
  settings ``packed``/``plain``).

    python benchmarks/runtime_switch.py --switch trim_tail --task trec --batch-size 8 --pairs 20 --out benchmarks/results/last_layer_trec.json
    python benchmarks/runtime_switch.py --switch fuse_norms --task trec --batch-size 8 --pairs 20 --out benchmarks/results/fused_norms_trec.json

A throughput on this VM drifts by 5-15% from one minute to the next, more than the few percent at
stake, so each method's module is built once as ``setup`` builds it under ``bf16-mixed`` (bf16
weights, fp32 stream, ``grouped`` attention; ``benchmarks/step_speed.py``'s ``bf16-weights``) and
timed with the switch on and off step by step, in ABBA order: ``--pairs`` train steps and forwards
of each. Reports per method whether one step's loss, scores and gradient are bitwise those with the
switch off, their relative gradient difference (``--fp32-reference``: the cosine of each gradient to
the ``32-true`` model's), the medians, the median of the paired ratios (off
over on) and each setting's train/forward ratio. ``--methods peft:<method>`` adds a PEFT peer
(needs the ``bench`` extra), timed in the same rotation (neither switch reaches it), for the ratio to it.
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

from step_speed import build  # noqa: E402  (run from the repository root: python benchmarks/runtime_switch.py)

#: switch -> the ``runtime`` flag and the names of its on and off settings
SWITCHES = {"trim_tail": ("TRIM_TAIL", ("trimmed", "whole")), "fuse_norms": ("FUSE_NORMS", ("fused", "own")),
            "pack_linears": ("PACK_LINEARS", ("packed", "plain"))}
SWITCHES_BY_FLAG = dict(SWITCHES.values())


def gradient(model, batch: dict, autocast: bool = True) -> tuple:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, scores = model.loss(batch)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad()
    return loss.detach(), scores.detach(), grad


def same_step(model, batch: dict, flag: str, reference=None) -> dict:
    """One loss and gradient with the switch on and off (no update): whether they are bitwise equal,
    and the relative gradient difference; with a ``reference`` (the same method as a ``32-true`` run
    builds it, from the same parameters) each gradient's cosine to the fp32 one, switch off there."""
    out = {}
    for on in (True, False):
        setattr(runtime, flag, on)
        out[on] = gradient(model, batch)
    (loss_t, scores_t, grad_t), (loss_w, scores_w, grad_w) = out[True], out[False]
    check = {"bitwise_equal": bool(torch.equal(loss_t, loss_w) and torch.equal(scores_t, scores_w) and torch.equal(grad_t, grad_w)),
             "forward_bitwise_equal": bool(torch.equal(loss_t, loss_w) and torch.equal(scores_t, scores_w)),
             "grad_rel_diff": float((grad_t - grad_w).norm() / grad_w.norm())}
    if reference is not None:
        trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        reference.load_state_dict(trained, strict=False)
        setattr(runtime, flag, False)
        exact = gradient(reference, batch, autocast=False)[2]
        check["fp32_cosine"] = {s: round(torch.nn.functional.cosine_similarity(g, exact, 0).item(), 5)
                                for s, g in zip(SWITCHES_BY_FLAG[flag], (grad_t, grad_w))}
    setattr(runtime, flag, True)
    return check


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switch", choices=sorted(SWITCHES), default="trim_tail")
    parser.add_argument("--task", default="trec")
    parser.add_argument("--methods", nargs="+", default=["soft_prompt", "prefix_tuning", "p_tuning"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-index", type=int, default=0, help="which training batch (bucketed, seed 0)")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--batches", type=int, default=1,
                        help="time pair i on training batch batch-index + i mod N (N > 1: the lengths vary, as in training)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32-reference", action="store_true",
                        help="also the cosine of each setting's gradient to the 32-true model's")
    parser.add_argument("--out", default="benchmarks/results/runtime_switch.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dm = DATAMODULES[load_task(args.task).family](task=args.task, batch_size=args.batch_size, max_length=args.max_length,
                                                  max_train_samples=args.batch_size * (args.batch_index + args.batches))
    dm.setup()
    batches = list(dm.train_dataloader())[args.batch_index:args.batch_index + args.batches]
    batch = batches[0]
    flag, settings = SWITCHES[args.switch]
    rows = []
    for method in args.methods:
        peer = method.startswith("peft:")
        train_step, forward = build(method.removeprefix("peft:"), "peft" if peer else "bf16-weights", "grouped", batch,
                                    dm.verbalizer)
        reference = build(method, "fp32", "grouped", batch, dm.verbalizer)[0].model if args.fp32_reference and not peer else None
        check = {} if peer else same_step(train_step.model, batch, flag, reference)
        del reference
        times = {s: {"train": [], "forward": []} for s in settings}
        for setting in settings:  # warm-up: first calls pick kernels
            setattr(runtime, flag, setting == settings[0])
            train_step(), forward()
        for i in range(args.pairs):
            for setting in (settings if i % 2 == 0 else settings[::-1]):
                setattr(runtime, flag, setting == settings[0])
                step_batch = batches[i % len(batches)]
                times[setting]["train"].append(timed(lambda: train_step(step_batch)))
                times[setting]["forward"].append(timed(lambda: forward(step_batch)))
        setattr(runtime, flag, True)
        med = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in times.items()}
        paired = {k: statistics.median(off / on for on, off in zip(times[settings[0]][k], times[settings[1]][k]))
                  for k in ("train", "forward")}
        row = {"switch": args.switch, "task": args.task, "method": method, "batch": args.batch_size,
               "seq_len": sorted({int(b["input_ids"].shape[1]) for b in batches}) if len(batches) > 1 else int(batch["input_ids"].shape[1]),
               "pairs": args.pairs, **check,
               **{s: {"train_s": round(med[s]["train"], 4), "forward_s": round(med[s]["forward"], 4),
                      "train_samples_per_s": round(args.batch_size / med[s]["train"], 2),
                      "train_over_forward": round(med[s]["train"] / med[s]["forward"], 3)} for s in settings},
               "train_speedup_paired": round(paired["train"], 3), "forward_speedup_paired": round(paired["forward"], 3),
               "times": {s: {k: [round(x, 4) for x in v] for k, v in t.items()} for s, t in times.items()}}
        print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
