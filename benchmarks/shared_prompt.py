"""A prompt run once per batch in a shared row (``share_prompt``: the soft prompt's vectors, and
the template's leading part that every row starts with) against the prompt in every row: the
same model, the same training batches, interleaved in one process so the VM's drift hits both
sides alike.

    python benchmarks/shared_prompt.py --task sst2 --out benchmarks/results/shared_prompt_sst2.json
    python benchmarks/shared_prompt.py --method p_tuning --num-virtual-tokens 6 \
        --template "{soft:3} Review: {sentence} {soft:3} Sentiment: {mask}" --row-saving 0 \
        --out benchmarks/results/shared_lead_sst2.json

Times the raw module step (forward, backward, AdamW) and a forward without gradients under
bf16 autocast with bf16 weights and the CPU's default attention, as the median over rounds of
the mean over the batches. ``--row-saving`` overrides the share of positions the row must save
(``prompt_cache.ROW_SAVING``) on the shared side; ``positions`` counts what each side computes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from datamodules import DATAMODULES
from prompt_methods import PTuning, SoftPrompt, prompt_cache, runtime
from prompt_methods.optim import adamw
from tasks.spec import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", choices=["soft_prompt", "p_tuning"], default="soft_prompt")
    parser.add_argument("--template", help="the task's default template unless given")
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--row-saving", type=float, help=f"share of positions the row must save (default {prompt_cache.ROW_SAVING})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/shared_prompt.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.row_saving is not None:
        prompt_cache.ROW_SAVING = args.row_saving
    extra = {"template": args.template} if args.template else {}
    dm = DATAMODULES[load_task(args.task).family](task=args.task, batch_size=args.batch_size, seed=42,
                                                  max_train_samples=args.batch_size * args.batches, **extra)
    dm.setup("fit")
    batches = list(dm.train_dataloader())[: args.batches]
    cls = {"soft_prompt": SoftPrompt, "p_tuning": PTuning}[args.method]
    model = cls(verbalizer=dm.verbalizer, num_virtual_tokens=args.num_virtual_tokens)
    model.configure_trainable()
    model.cast_backbone(torch.bfloat16)
    model.backbone.set_attn_implementation(runtime.attention("auto", "cpu", model.kind))
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # the fused AdamW that training uses

    def train(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward(batch):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.loss(batch)

    times = {(share, kind): [] for share in (True, False) for kind in ("train", "forward")}
    for batch in batches:  # warm-up: every batch shape once per setting (oneDNN builds a kernel per shape)
        for share in (True, False):
            model.share_prompt = share
            train(batch)
            forward(batch)
    for _ in range(args.rounds):
        for share in (True, False):
            model.share_prompt = share
            for kind, fn in (("train", train), ("forward", forward)):
                start = time.perf_counter()
                for batch in batches:
                    fn(batch)
                times[(share, kind)].append((time.perf_counter() - start) / len(batches))
    rows = []
    for share in (True, False):
        tr, fw = statistics.median(times[(share, "train")]), statistics.median(times[(share, "forward")])
        model.share_prompt = share
        feeds = [model.feed(b) for b in batches]
        shared_batches = sum(f.prompt_row is not None for f in feeds)
        positions = sum(f.inputs_embeds.size(0) * f.inputs_embeds.size(1) + (f.prompt_row is not None) * f.inputs_embeds.size(1)
                        for f in feeds)
        rows.append({"task": args.task, "method": args.method, "template": dm.hparams.template or load_task(args.task).template,
                     "row_saving": prompt_cache.ROW_SAVING, "attn": model.backbone.config._attn_implementation,
                     "share_prompt": share, "batch": args.batch_size, "batches": len(batches), "positions": positions,
                     "batches_sharing": shared_batches, "num_virtual_tokens": args.num_virtual_tokens,
                     "mean_len": round(sum(b["input_ids"].size(1) for b in batches) / len(batches), 1),
                     "train_ms": round(tr * 1000, 1), "forward_ms": round(fw * 1000, 1),
                     "train_samples_per_s": round(args.batch_size / tr, 2), "train_over_forward": round(tr / fw, 2),
                     "train_rounds_ms": [round(t * 1000, 1) for t in times[(share, "train")]]})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
