"""Train steps of a real Lightning fit, against the forward of the same batches and per precision.

    python benchmarks/fit_step.py --task sst2 --batch-size 16 --steps 14 --precisions 32-true bf16-mixed \
        --out benchmarks/results/fit_step_sst2.json

``benchmarks/step_speed.py`` times a bare loop of forward, backward and AdamW; this script times
what ``train.py fit`` runs: the Trainer's step (the module's ``training_step``, the backward, the
optimizer, Lightning's hooks and logging) on ``--steps`` training batches of the task, each module
set up by the Trainer for its precision (bf16 weights and the fp32 stream under ``bf16-mixed``,
fused norms, packed weights). After each step a forward of the same batch, without gradients and
under the same precision context, is timed, so each step has its own train/forward ratio. Per
method and precision it reports the medians over the steps after the first two (which allocate and
pick kernels), the median of the per-step ratios, and the new pages the process faulted in per
step. No validation runs. Each method and precision runs in its own process, in turn, ``--repeats``
times (this VM's speed drifts by 5-15% from one minute to the next; compare runs side by side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from step_speed import METHODS as STEP_METHODS, page_faults  # noqa: E402  (run as python benchmarks/fit_step.py)

ROOT = Path(__file__).resolve().parents[1]
#: the frozen-backbone prompt methods, built as step_speed.py builds them
METHODS = {name: STEP_METHODS[name] for name in ("soft_prompt", "prefix_tuning", "p_tuning")}


def one_run(task: str, method: str, precision: str, batch_size: int, steps: int, threads: int) -> dict:
    """One fit in this process: per step its time, its page faults and the forward of its batch."""
    import lightning as L
    import torch

    from datamodules import DATAMODULES
    from tasks.spec import load_task

    torch.set_num_threads(threads)
    L.seed_everything(0, verbose=False)  # the same batches, and prompt, under every precision
    dm = DATAMODULES[load_task(task).family](task=task, max_train_samples=batch_size * steps, batch_size=batch_size)
    dm.setup("fit")
    cls, kwargs = METHODS[method]
    model = cls(backbone="smollm2-135m", verbalizer=dm.verbalizer, **kwargs)
    per_step = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.faults, self.start = page_faults(), time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step_s, faults = time.perf_counter() - self.start, page_faults() - self.faults
            start = time.perf_counter()
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                pl_module.loss(batch)
            per_step.append({"train_s": step_s, "forward_s": time.perf_counter() - start, "page_faults": faults,
                             "tokens": int(batch["input_ids"].shape[1])})

    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=steps, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[Timer()])
    trainer.fit(model, datamodule=dm)
    kept = per_step[2:]
    median = statistics.median
    return {"task": task, "method": method, "precision": precision, "batch": batch_size, "steps_timed": len(kept),
            "train_s": round(median(s["train_s"] for s in kept), 4),
            "forward_s": round(median(s["forward_s"] for s in kept), 4),
            "train_over_forward": round(median(s["train_s"] / s["forward_s"] for s in kept), 3),
            "page_faults_per_step": median(s["page_faults"] for s in kept),
            "tokens": [s["tokens"] for s in kept]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one run, as JSON
    parser.add_argument("--out", default="benchmarks/results/fit_step.json")
    args = parser.parse_args()
    if args.run:
        method, precision = json.loads(args.run)
        print(json.dumps(one_run(args.task, method, precision, args.batch_size, args.steps, args.threads)))
        return
    rows = []
    for repeat in range(args.repeats):
        for method in args.methods:
            for precision in args.precisions:
                done = subprocess.run([sys.executable, __file__, "--run", json.dumps([method, precision]), "--task", args.task,
                                       "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                                       "--threads", str(args.threads)], capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    raise SystemExit(f"{method} {precision} failed:\n{done.stderr[-3000:]}")
                row = {**json.loads(done.stdout.strip().splitlines()[-1]), "repeat": repeat}
                print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
                rows.append(row)
    for method in args.methods:  # bf16 over fp32, per repeat
        for repeat in range(args.repeats):
            by = {r["precision"]: r for r in rows if r["method"] == method and r["repeat"] == repeat}
            if "32-true" in by:
                for precision, r in by.items():
                    r["train_speedup_over_32_true"] = round(by["32-true"]["train_s"] / r["train_s"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
