"""What rounding the rotary (RoPE) frequencies to bf16 does to the packaged SmolLM2.

    python benchmarks/rope_precision.py --task boolq --out benchmarks/results/rope_precision.json

``backbone.to(torch.bfloat16)`` casts the ``inv_freq`` buffers too; promptlit keeps them fp32
(``PromptModule.cast_backbone``). This runs the fp32 model on one training batch twice, with the
frequencies as loaded and rounded to bf16, and compares the last hidden states and label scores.
For scale it also reports the bf16 backbone (bf16 weights under autocast, fp32 residual stream,
fp32 frequencies) against the same fp32 model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from datamodules import DATAMODULES
from prompt_methods import HardPrompt
from prompt_methods.readout import base_forward
from tasks.spec import load_task


def compare(model, batch, ref_hidden, ref_scores) -> dict:
    with torch.no_grad():
        hidden = base_forward(model.backbone, model.feed(batch)).last_hidden_state.float()
        scores = model(batch).float()
    mask = batch["attention_mask"].bool()
    rel = ((hidden - ref_hidden).norm(dim=-1) / ref_hidden.norm(dim=-1))[mask]
    diff = (scores - ref_scores).abs()
    return {"hidden_rel_err_mean": round(rel.mean().item(), 5), "hidden_rel_err_max": round(rel.max().item(), 5),
            "score_abs_diff_mean": round(diff.mean().item(), 5), "score_abs_diff_max": round(diff.max().item(), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="boolq")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--out", default="benchmarks/results/rope_precision.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dm = DATAMODULES[load_task(args.task).family](task=args.task, max_train_samples=args.batch_size,
                                                  batch_size=args.batch_size, max_length=args.max_length)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model = HardPrompt(backbone="smollm2-135m", verbalizer=dm.verbalizer).eval()
    rotary = [m for m in model.backbone.modules() if hasattr(m, "inv_freq")]
    freqs = [m.inv_freq.clone() for m in rotary]
    with torch.no_grad():
        ref_hidden = base_forward(model.backbone, model.feed(batch)).last_hidden_state.float()
        ref_scores = model(batch).float()
    for m, f in zip(rotary, freqs):
        m.inv_freq = f.bfloat16().float()
    rounded = compare(model, batch, ref_hidden, ref_scores)
    for m, f in zip(rotary, freqs):
        m.inv_freq = f
    model.cast_backbone(torch.bfloat16)
    model.choose_residual_stream(torch.bfloat16, "bf16-mixed")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = compare(model, batch, ref_hidden, ref_scores)
    row = {"task": args.task, "shape": list(batch["input_ids"].shape),
           "inv_freq_rounding_rel_max": round(((freqs[0].bfloat16().float() - freqs[0]).abs() / freqs[0]).max().item(), 5),
           "fp32_model_bf16_frequencies": rounded, "bf16_backbone_fp32_frequencies": bf16}
    print(json.dumps(row, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
