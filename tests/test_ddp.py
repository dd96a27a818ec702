"""Multi-process training: ``trainer.strategy: ddp`` with 2 CPU processes (gloo) gives the same
prompt and metric as one process with the same global batch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(tiny, files, out: Path, config: str, extra: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, "train.py", "fit", "--config", config, "--model.init_args.backbone", tiny("llama"),
           "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
           "--data.init_args.train_file", files["train"], "--data.init_args.validation_file", files["validation"],
           "--data.init_args.test_file", files["test"], "--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
           "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out), *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(next(out.rglob("last.ckpt")), weights_only=True)
    with open(next(out.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/score")]
    return ckpt["state_dict"], float(rows[-1]["val/score"])


TUNED = ["--model.init_args.tune_backbone", "true", "--model.init_args.lr", "1e-3"]


@pytest.mark.parametrize("config,weight,extra", [
    ("configs/sst2/soft_prompt.yaml", "prompt", []),
    ("configs/sst2/prefix_tuning.yaml", "prefix.kv", []),
    ("configs/sst2/p_tuning.yaml", "prompt_encoder.mlp.2.weight", []),
    # a tuned backbone (the tiny Llama has no dropout, so both runs compute the same gradients)
    ("configs/sst2/hard_prompt.yaml", "backbone.model.layers.0.mlp.down_proj.weight", TUNED),
])
def test_ddp_two_processes_match_one(config, weight, extra, tiny, family_files, tmp_path):
    files = family_files["sst2"]
    single, single_score = run(tiny, files, tmp_path / "single", config,
                               ["--trainer.devices", "1", "--data.init_args.batch_size", "4", *extra])
    ddp, ddp_score = run(tiny, files, tmp_path / "ddp", config,
                         ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.batch_size", "2", *extra])
    torch.testing.assert_close(ddp[weight], single[weight], rtol=0, atol=1e-5)
    assert abs(ddp_score - single_score) < 1e-6
    # without the gradient all-reduce, a process would train on its half of each batch: far from both
    half, _ = run(tiny, files, tmp_path / "half", config, ["--trainer.devices", "1", "--data.init_args.batch_size", "2", *extra])
    assert (half[weight] - single[weight]).abs().max() > 100 * 1e-5


@pytest.mark.parametrize("task", ["sst2", "semeval"])
def test_ddp_scores_an_odd_split_once(task, tiny, family_files, tmp_path):
    """Five validation examples on two processes: three and two, none scored twice, so the score
    (accuracy, or SemEval's macro-F1 gathered from both processes) is one process's score."""
    files = dict(family_files[task])
    lines = Path(files["validation"]).read_text().splitlines(keepends=True)
    head = lines[:1] if task == "sst2" else []  # the tsv's header row
    odd = tmp_path / f"five{Path(files['validation']).suffix}"
    odd.write_text("".join(head + lines[len(head):][:5]))
    files["validation"] = str(odd)
    config = f"configs/{task}/soft_prompt.yaml"
    single, _ = run(tiny, files, tmp_path / "single", config, ["--trainer.devices", "1", "--data.init_args.batch_size", "4"])
    ddp, _ = run(tiny, files, tmp_path / "ddp", config,
                 ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.batch_size", "2"])
    torch.testing.assert_close(ddp["prompt"], single["prompt"], rtol=0, atol=1e-5)
    # every validation (steps 2, 4, 6), not only the last: the tiny model ends up right on all five,
    # where a repeated example no longer shows (5 of 5 and 6 of 6 alike)
    rows = {name: [r for r in csv.DictReader(open(next((tmp_path / name).rglob("metrics.csv")))) if r.get("val/score")]
            for name in ("single", "ddp")}
    scores = {name: [float(r["val/score"]) for r in rows[name]] for name in rows}
    assert len(scores["single"]) == 3
    if task == "sst2":  # else a repeated example would not show; SemEval's tiny run scores F1 0 throughout,
        assert any(0 < score < 1 for score in scores["single"])  # so there the case guards the gather itself
    torch.testing.assert_close(scores["ddp"], scores["single"], rtol=0, atol=1e-6)
    # the loss too is the mean over the five examples, not a mean of the two processes' means (3 and 2)
    # (fp32 rounding aside: batches of 2 and 4 rows may sum a matmul in another order, ~25 on SemEval)
    losses = {name: torch.tensor([float(r["val/loss"]) for r in rows[name]]) for name in rows}
    torch.testing.assert_close(losses["ddp"], losses["single"], rtol=1e-6, atol=1e-5)


def test_ddp_predict_writes_every_rank_into_one_run_folder(tiny, family_files, tmp_path):
    """With the default W&B logger only rank 0 has a run; every rank's predictions go to its folder,
    and the five examples are each predicted once."""
    files = family_files["sst2"]
    five = tmp_path / "five.tsv"
    five.write_text("".join(Path(files["test"]).read_text().splitlines(keepends=True)[:6]))  # header + 5 rows
    cmd = [sys.executable, "train.py", "predict", "--config", "configs/sst2/hard_prompt.yaml",
           "--model.init_args.backbone", tiny("llama"), "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(tmp_path / "out"), "--data.init_args.test_file", str(five),
           "--data.init_args.eval_batch_size", "2"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted((tmp_path / "out").rglob("predictions.rank*.jsonl"))
    assert [p.name for p in written] == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    assert written[0].parent == written[1].parent and "version_None" not in str(written[0])
    ids = [json.loads(line)["id"] for p in written for line in p.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 5
