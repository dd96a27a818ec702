"""How close a bf16-mixed prompt gradient stays to the fp32 model's, per attention kernel.

    python benchmarks/attention_precision.py --task sst2 --methods soft_prompt --init-seeds 42 0 \
        --out benchmarks/results/attention_precision_sst2.json

Under ``bf16-mixed`` the ``grouped`` kernel (and transformers' eager attention) computes the
attention scores as a bf16 matmul, so the scores are rounded to 8 bits of mantissa before the
softmax; PyTorch's CPU SDPA (what a PEFT user gets) keeps them in fp32 inside. This builds each
method as ``setup`` does under ``bf16-mixed`` (bf16 weights, fp32 residual stream) once per kernel
(``grouped``, ``grouped_fp32_scores``: the same kernel with the query-key product and softmax in
fp32, ``sdpa``, ``eager``), all from the fp32 reference's initial prompt, and reports per training
batch the cosine between each one's gradient and the fp32 model's, and interleaved train-step times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from residual_stream import build, gradient, training_batches  # the sibling script
from prompt_methods import attention

FP32_SCORES = "grouped_fp32_scores"


def grouped_fp32_scores(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``grouped`` with the scores and softmax in fp32 (the value product stays in the autocast dtype)."""
    b, h, t, d = query.shape
    n, s = key.shape[1], key.shape[2]
    g = h // n
    low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    with torch.autocast("cpu", enabled=False):
        scores = torch.matmul((query.float() * scaling).reshape(b, n, g * t, d), key.float().transpose(2, 3))
        if attention_mask is not None:
            mask = attention_mask[:, :, :, :s].float()
            mask = mask.unsqueeze(1) if mask.shape[1] == 1 else mask.reshape(mask.shape[0], n, g, t, s)
            scores = (scores.view(b, n, g, t, s) + mask).view(b, n, g * t, s)
        probs = torch.softmax(scores, dim=-1).to(low)
        out = torch.matmul(probs, value.to(low)).view(b, h, t, value.size(-1)).transpose(1, 2).contiguous()
    return out, probs.view(b, h, t, s)


AttentionInterface.register(FP32_SCORES, grouped_fp32_scores)
AttentionMaskInterface.register(FP32_SCORES, eager_mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--methods", nargs="+", default=["soft_prompt"])
    parser.add_argument("--kernels", nargs="+", default=[attention.NAME, FP32_SCORES, "sdpa", "eager"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--init-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/attention_precision.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods:
        dm, batches = training_batches(args.task, method, args.batch_size, args.batches)
        row = {"task": args.task, "method": method, "batch": args.batch_size, "init_seeds": args.init_seeds,
               "lengths": [int(b["input_ids"].shape[1]) for b in batches], "cosine": {k: [] for k in args.kernels}}
        for seed in args.init_seeds:
            reference = build(method, dm.verbalizer, "32-true", "float32", None, seed)
            state = {k: v for k, v in reference.state_dict().items() if not k.startswith("backbone.")}
            models = {}
            for kernel in args.kernels:
                models[kernel] = build(method, dm.verbalizer, "bf16-mixed", "float32", state)
                models[kernel].backbone.set_attn_implementation(kernel)
            for batch in batches:
                exact = gradient(reference, batch, autocast=False)
                for kernel, model in models.items():
                    cos = torch.nn.functional.cosine_similarity(gradient(model, batch, autocast=True), exact, 0).item()
                    row["cosine"][kernel].append(round(cos, 4))
        times = {k: [] for k in args.kernels}  # with the last init seed's models, kernels in turn
        for _ in range(args.rounds):
            for kernel, model in models.items():
                gradient(model, batches[0], autocast=True)
                start = time.perf_counter()
                for batch in batches:
                    gradient(model, batch, autocast=True)
                times[kernel].append(round((time.perf_counter() - start) / len(batches), 4))
        row["step_s"] = times
        row["summary"] = {k: {"mean_cosine": round(statistics.mean(row["cosine"][k]), 4), "min_cosine": min(row["cosine"][k]),
                              "median_step_s": statistics.median(times[k]) if times[k] else None} for k in args.kernels}
        print(json.dumps({k: row[k] for k in ("task", "method", "summary")}), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
