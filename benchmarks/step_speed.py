"""Train-step and forward speed of each method on the packaged SmolLM2, per precision setup.

    python benchmarks/step_speed.py --methods soft_prompt prefix_tuning --steps 8 --out benchmarks/results/step_speed.json
    python benchmarks/step_speed.py --setups fp32 bf16-weights bf16-stream bf16-pure --attn grouped \
        --rounds 5 --steps 3 --out benchmarks/results/step_speed_precision_rounds.json

Setups: ``fp32`` (32-true), ``bf16-autocast`` (fp32 weights under bf16 autocast, what plain
``bf16-mixed`` does), ``bf16-weights`` (frozen backbone stored in bf16 under autocast: what
``backbone_dtype: auto`` picks with ``bf16-mixed``, with the fp32 residual stream of
``residual_dtype: float32``; results recorded before it came to this script had a bf16 stream),
``bf16-stream`` (the same with ``residual_dtype: bfloat16``: hidden states between the layers in
bf16 too), ``bf16-pure`` (bf16 weights, no autocast: activations stay bf16, method parameters
fp32 and cast on use), each with eager or sdpa attention, and ``peft`` (the method through
``peft.get_peft_model`` as the benchmark's PEFT peer runs it: fp32 weights under bf16 autocast,
SDPA attention; needs the ``bench`` extra); ``--compile`` compiles each layer first
(``model.init_args.compile``; ``train_first_s`` then includes the compile). ``--profile N`` prints the N costliest
operators of a train step (torch.profiler, CPU time). ``--rounds R`` builds every setup of a method
first and times them in turn, R times, keeping each one's median round: on this VM a throughput
moves by 5-15% from one minute to the next, so only setups timed side by side compare.
Times the raw module step (forward, backward, AdamW) so the numbers isolate the model; "forward"
is the same loss computed without gradients. ``--task`` picks any task (its DataModule by family).
``--allocator keep`` (the default) has glibc keep the memory a step frees (:func:`keep_freed_memory`):
this bare loop otherwise faults in up to 48k new pages per bf16 train step and 40-106k per fp32
one (SST-2 batch 16; 27-43k on a bf16 BoolQ batch of 8), 0.1-0.3 s of an fp32 step, where the median step
of a Lightning fit faults in 0-55 (the loop faults with either of the two thresholds set alone), so it
would time a cost that training does not pay. ``--allocator glibc`` leaves glibc's own thresholds (results recorded before this
option had them). Process-wide: every setup of a run, ``peft`` included, gets the same. Rows timed
in rounds also give ``train_page_faults``, the median number of pages faulted in per train step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from datamodules import DATAMODULES
from tasks.spec import load_task
from prompt_methods import FineTuning, HardPrompt, PrefixTuning, PTuning, SoftPrompt, runtime
from prompt_methods.optim import adamw

METHODS = {
    "soft_prompt": (SoftPrompt, {"num_virtual_tokens": 20}),
    "prefix_tuning": (PrefixTuning, {"num_virtual_tokens": 20}),
    "p_tuning": (PTuning, {"num_virtual_tokens": 6}),
    "hard_prompt": (HardPrompt, {"tune_backbone": True}),
    "fine_tuning": (FineTuning, {}),
}


def build(method: str, setup: str, attn: str, batch: dict, verbalizer, compile_layers: bool = False,
          tokens: int | None = None, fused: bool = True):
    """The module for one setup and its two timed closures: a train step and a forward without gradients.
    ``tokens`` overrides the method's ``num_virtual_tokens``; ``fused=False`` steps the unfused AdamW."""
    cls, kwargs = METHODS[method]
    if tokens and "num_virtual_tokens" in kwargs:
        kwargs = {**kwargs, "num_virtual_tokens": tokens}
    if setup == "peft":  # the same method through peft.get_peft_model, as the benchmark's peer runs it
        from prompt_methods.peft_peer import PeftPeer

        cls, kwargs = PeftPeer, {"peft_method": method, "num_virtual_tokens": kwargs["num_virtual_tokens"]}
    elif setup == "bf16-stream":
        kwargs = {**kwargs, "residual_dtype": "bfloat16"}
    model = cls(backbone="smollm2-135m", verbalizer=verbalizer, **kwargs)
    model.configure_trainable()
    if setup in ("bf16-weights", "bf16-stream", "bf16-pure") and not model.tune_backbone:
        model.cast_backbone(torch.bfloat16)
        if setup != "bf16-pure":  # as PromptModule.setup under bf16-mixed
            model.choose_residual_stream(torch.bfloat16, "bf16-mixed")
    model.backbone.set_attn_implementation("sdpa" if setup == "peft" else attn)  # PEFT: what from_pretrained gives
    if compile_layers:
        runtime.compile_blocks(model.backbone, attention=model.compile_attention)
    else:  # as PromptModule.setup (the PEFT peer keeps the model's own norms and plain matmuls)
        if model.fused_norms:
            runtime.fuse_norms(model.backbone)
        if model.packs_weights:
            runtime.pack_linears(model.backbone)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if setup not in ("fp32", "bf16-pure") else nullcontext
    opt = adamw([p for p in model.parameters() if p.requires_grad], 1e-3, fused)  # fused, as training has it

    def train_step(step_batch=batch):
        with ctx():
            loss = model.loss(step_batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward(step_batch=batch):
        with torch.no_grad(), ctx():
            model.loss(step_batch)

    train_step.model = model  # for scripts that inspect the module they time (benchmarks/runtime_switch.py)
    return train_step, forward


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve blocks up to 32 MiB from its heap and never trim the heap, so that each
    step reuses the pages the last one freed. Returns whether glibc took both settings."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    # the block limit first: a refused value changes nothing, while setting either fixes both thresholds
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def page_faults() -> int:
    """Pages this process has faulted in so far (minor faults: new memory the kernel had to map)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def row(task: str, method: str, setup: str, attn: str, compile_layers: bool, batch: dict, train_s: float,
        forward_s: float, **extra) -> dict:
    size = len(batch["ids"])
    attn = "sdpa" if setup == "peft" else attn  # the peer runs what from_pretrained gives (build)
    return {"task": task, "method": method, "setup": setup, "attn": attn, "compile": compile_layers, "batch": size,
            "seq_len": int(batch["input_ids"].shape[1]), **extra,
            "train_s": round(train_s, 4), "train_samples_per_s": round(size / train_s, 2),
            "forward_s": round(forward_s, 4), "forward_samples_per_s": round(size / forward_s, 2),
            "train_over_forward": round(train_s / forward_s, 2)}


def measure(task: str, method: str, setup: str, attn: str, batch: dict, verbalizer, steps: int, profile: int = 0,
            compile_layers: bool = False, tokens: int | None = None) -> dict:
    """One setup on its own: first calls (the compile, when compiling), then ``steps`` timed calls of each."""
    train_step, forward = build(method, setup, attn, batch, verbalizer, compile_layers, tokens)
    first = {}
    for name, fn in (("train", train_step), ("forward", forward)):
        start = time.perf_counter()
        fn()  # the first call compiles, when compiling
        first[f"{name}_first_s"] = round(time.perf_counter() - start, 2)
        fn()
    out = row(task, method, setup, attn, compile_layers, batch, timed(train_step, steps), timed(forward, steps), **first)
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step()
        print(f"--- {method} {setup} {attn}: one train step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile))
    return out


def measure_interleaved(task: str, method: str, setups: list[str], attn: str, batch: dict, verbalizer, steps: int,
                        rounds: int, tokens: int | None = None) -> list[dict]:
    """Every setup built first, then timed in turn, ``rounds`` times (``steps`` train steps, then
    ``steps`` forwards, per setup and round): a slow spell of the machine falls on all of them.
    Reports each setup's median round, and its ratio to the first setup's (``fp32`` by default)."""
    built = {setup: build(method, setup, attn, batch, verbalizer, tokens=tokens) for setup in setups}
    for train_step, forward in built.values():  # warm-up: first calls allocate and pick kernels
        train_step(), forward()
    times = {setup: {"train": [], "forward": [], "faults": []} for setup in setups}
    for _ in range(rounds):
        for setup, (train_step, forward) in built.items():
            before = page_faults()
            times[setup]["train"].append(timed(train_step, steps))
            times[setup]["faults"].append((page_faults() - before) / steps)
            times[setup]["forward"].append(timed(forward, steps))
    rows = []
    for setup in setups:
        train_s, forward_s = (statistics.median(times[setup][k]) for k in ("train", "forward"))
        rows.append(row(task, method, setup, attn, False, batch, train_s, forward_s, rounds=rounds, steps_per_round=steps,
                        virtual_tokens=tokens or METHODS[method][1].get("num_virtual_tokens"),
                        train_page_faults=statistics.median(times[setup]["faults"]),
                        train_rounds_s=[round(t, 4) for t in times[setup]["train"]],
                        forward_rounds_s=[round(t, 4) for t in times[setup]["forward"]]))
    base = rows[0]["train_s"]
    for r in rows:
        r[f"train_speedup_over_{setups[0]}"] = round(base / r["train_s"], 2)
    return rows


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
    parser.add_argument("--tokens", type=int, help="num_virtual_tokens of every method (default: 20, 20, 6)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="build every setup of a method, then time them in turn this many times and keep the median "
                             "round (steps per setup and round: --steps); 0: one setup after another")
    parser.add_argument("--allocator", choices=("keep", "glibc"), default="keep",
                        help="keep: glibc keeps the memory a step frees for the next one, so that the loop "
                             "faults in no new pages, as a Lightning fit does not; glibc: its own thresholds")
    parser.add_argument("--out", default="benchmarks/results/step_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.allocator == "keep" else False
    dm = DATAMODULES[load_task(args.task).family](task=args.task, max_train_samples=args.batch_size,
                                                  batch_size=args.batch_size, max_length=args.max_length)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    rows = []
    for method in args.methods:
        for attn in args.attn:
            if args.rounds:
                got = measure_interleaved(args.task, method, args.setups, attn, batch, dm.verbalizer, args.steps, args.rounds,
                                          args.tokens)
            else:
                got = [measure(args.task, method, setup, attn, batch, dm.verbalizer, args.steps, args.profile, args.compile,
                                   args.tokens) for setup in args.setups]
            for r in got:
                print(json.dumps(r), flush=True)
            rows.extend(got)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "freed_memory_kept": kept, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
