"""Train-step and forward speed of each method on the packaged SmolLM2, per precision setup.

    python benchmarks/step_speed.py --methods soft_prompt prefix_tuning --steps 8 --out benchmarks/results/step_speed.json

Setups: ``fp32`` (32-true), ``bf16-autocast`` (fp32 weights under bf16 autocast, what plain
``bf16-mixed`` does), ``bf16-weights`` (frozen backbone stored in bf16 under autocast: what
``backbone_dtype: auto`` picks with ``bf16-mixed``, with the fp32 residual stream of
``residual_dtype: float32``; results recorded before it came to this script had a bf16 stream), ``bf16-pure`` (bf16 weights, no autocast: activations stay bf16, method parameters
fp32 and cast on use), each with eager or sdpa attention; ``--compile`` compiles each layer first
(``model.init_args.compile``; ``train_first_s`` then includes the compile). ``--profile N`` prints the N costliest
operators of a train step (torch.profiler, CPU time).
Times the raw module step (forward, backward, AdamW) so the numbers isolate the model; "forward"
is the same loss computed without gradients. ``--task`` picks any task (its DataModule by family).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from datamodules import DATAMODULES
from tasks.spec import load_task
from prompt_methods import FineTuning, HardPrompt, PrefixTuning, PTuning, SoftPrompt, runtime

METHODS = {
    "soft_prompt": (SoftPrompt, {"num_virtual_tokens": 20}),
    "prefix_tuning": (PrefixTuning, {"num_virtual_tokens": 20}),
    "p_tuning": (PTuning, {"num_virtual_tokens": 6}),
    "hard_prompt": (HardPrompt, {"tune_backbone": True}),
    "fine_tuning": (FineTuning, {}),
}


def measure(task: str, method: str, setup: str, attn: str, batch: dict, verbalizer, steps: int, profile: int = 0,
            compile_layers: bool = False) -> dict:
    cls, kwargs = METHODS[method]
    model = cls(backbone="smollm2-135m", verbalizer=verbalizer, **kwargs)
    model.configure_trainable()
    if setup in ("bf16-weights", "bf16-pure") and not model.tune_backbone:
        model.cast_backbone(torch.bfloat16)
        if setup == "bf16-weights":  # as PromptModule.setup under bf16-mixed
            model.choose_residual_stream(torch.bfloat16, "bf16-mixed")
    model.backbone.set_attn_implementation(attn)
    if compile_layers:
        runtime.compile_blocks(model.backbone, attention=model.compile_attention)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if setup not in ("fp32", "bf16-pure") else nullcontext
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def train_step():
        with ctx():
            loss = model.loss(batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad(), ctx():
            model.loss(batch)

    size = len(batch["ids"])
    out = {"task": task, "method": method, "setup": setup, "attn": attn, "compile": compile_layers, "batch": size,
           "seq_len": int(batch["input_ids"].shape[1])}
    for name, fn in (("train", train_step), ("forward", forward)):
        start = time.perf_counter()
        fn()  # the first call compiles, when compiling
        out[f"{name}_first_s"] = round(time.perf_counter() - start, 2)
        fn()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sec = (time.perf_counter() - start) / steps
        out[f"{name}_s"] = round(sec, 4)
        out[f"{name}_samples_per_s"] = round(size / sec, 2)
    out["train_over_forward"] = round(out["train_s"] / out["forward_s"], 2)
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step()
        print(f"--- {method} {setup} {attn}: one train step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--setups", nargs="+", default=["fp32", "bf16-autocast", "bf16-weights"])
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile each layer (model.init_args.compile)")
    parser.add_argument("--profile", type=int, default=0, help="print the N costliest operators of a train step")
    parser.add_argument("--out", default="benchmarks/results/step_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = DATAMODULES[load_task(args.task).family](task=args.task, max_train_samples=args.batch_size,
                                                  batch_size=args.batch_size, max_length=args.max_length)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    rows = []
    for method in args.methods:
        for setup in args.setups:
            for attn in args.attn:
                row = measure(args.task, method, setup, attn, batch, dm.verbalizer, args.steps, args.profile, args.compile)
                print(json.dumps(row), flush=True)
                rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
