"""bf16-mixed with a bf16 backbone: hidden states between the layers in fp32 or in bf16 (``residual_dtype``).

    python benchmarks/residual_stream.py --task sst2 --methods soft_prompt prefix_tuning p_tuning \
        --out benchmarks/results/residual_stream_sst2.json

For each method it builds the module three times on the packaged SmolLM2 as ``setup`` does under
``bf16-mixed`` (``residual_dtype: float32`` and ``bfloat16``) and under ``32-true`` (the reference),
all from the same initial prompt, and reports per training batch:

- the cosine between the trained parameters' gradient and the fp32 model's (1 = the same direction),
  for each initial prompt drawn with ``--init-seeds`` (how well a prompt's gradient survives bf16
  depends on where it starts);
- the train step (forward, backward, AdamW) time of both settings, interleaved over ``--rounds``
  (``--rounds 0``: no timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from datamodules import DATAMODULES
from tasks.spec import load_task
from prompt_methods import PrefixTuning, PTuning, SoftPrompt
from prompt_methods.optim import adamw

METHODS = {
    "soft_prompt": (SoftPrompt, {"num_virtual_tokens": 20}, None),
    "prefix_tuning": (PrefixTuning, {"num_virtual_tokens": 10}, None),
    "p_tuning": (PTuning, {"num_virtual_tokens": 6}, "{soft:3} Review: {sentence} {soft:3} Sentiment: {mask}"),
}


def build(method: str, verbalizer, precision: str, residual: str, state: dict | None, seed: int = 0):
    cls, kwargs, _ = METHODS[method]
    torch.manual_seed(seed)
    model = cls(backbone="smollm2-135m", verbalizer=verbalizer, residual_dtype=residual, **kwargs)
    model.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                              enable_model_summary=False)
    model.setup("fit")  # weight dtype, norms, attention: as a run with this precision
    if state is not None:
        model.load_state_dict(state, strict=False)
    return model


def training_batches(task: str, method: str, batch_size: int, n: int):
    """The task's DataModule and its first ``n`` training batches (on SST-2 with the method's template)."""
    template = METHODS[method][2] if task == "sst2" else None
    dm = DATAMODULES[load_task(task).family](task=task, batch_size=batch_size, seed=1, max_train_samples=batch_size * n,
                                             **({"template": template} if template else {}))
    dm.setup("fit")
    return dm, list(dm.train_dataloader())[:n]


def gradient(model, batch, autocast: bool) -> torch.Tensor:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(batch)[0]
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--init-seeds", type=int, nargs="+", default=[0], help="seeds drawing the initial prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/residual_stream.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods:
        dm, batches = training_batches(args.task, method, args.batch_size, args.batches)
        residuals = ("float32", "bfloat16")
        row = {"task": args.task, "method": method, "batch": args.batch_size, "init_seeds": args.init_seeds,
               "lengths": [int(b["input_ids"].shape[1]) for b in batches], "cosine": {r: [] for r in residuals}}
        for seed in args.init_seeds:  # cosines of every batch, init seed after init seed
            reference = build(method, dm.verbalizer, "32-true", "float32", None, seed)
            state = {k: v for k, v in reference.state_dict().items() if not k.startswith("backbone.")}
            models = {r: build(method, dm.verbalizer, "bf16-mixed", r, state) for r in residuals}
            for batch in batches:
                exact = gradient(reference, batch, autocast=False)
                for residual, model in models.items():
                    cos = torch.nn.functional.cosine_similarity(gradient(model, batch, autocast=True), exact, 0).item()
                    row["cosine"][residual].append(round(cos, 4))
        times = {r: [] for r in residuals}  # with the last init seed's models
        for i in range(args.rounds):
            for residual in (("float32", "bfloat16") if i % 2 == 0 else ("bfloat16", "float32")):
                model = models[residual]
                opt = adamw([p for p in model.parameters() if p.requires_grad], lr=0.0)  # as training's: fused

                def step(batch):
                    gradient(model, batch, autocast=True)
                    opt.step()

                step(batches[0])
                start = time.perf_counter()
                for batch in batches:
                    step(batch)
                times[residual].append(round((time.perf_counter() - start) / len(batches), 4))
        row["step_s"] = times
        row["summary"] = {r: {"mean_cosine": round(statistics.mean(row["cosine"][r]), 4), "min_cosine": min(row["cosine"][r]),
                              "median_step_s": statistics.median(times[r]) if times[r] else None} for r in residuals}
        if args.rounds:
            row["fp32_stream_step_cost"] = round(row["summary"]["float32"]["median_step_s"]
                                                 / row["summary"]["bfloat16"]["median_step_s"] - 1, 4)
        print(json.dumps({k: row.get(k) for k in ("task", "method", "summary", "fp32_stream_step_cost")}), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
