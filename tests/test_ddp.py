"""Multi-process training: ``trainer.strategy: ddp`` with 2 CPU processes (gloo) gives the same
prompt and metric as one process with the same global batch."""

from __future__ import annotations

import csv
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


@pytest.mark.parametrize("config,weight,atol", [
    ("configs/sst2/soft_prompt.yaml", "prompt", 1e-5),
    ("configs/sst2/prefix_tuning.yaml", "prefix.kv", 1e-5),
    ("configs/sst2/p_tuning.yaml", "prompt_encoder.mlp.2.weight", 1e-5),
    # a tuned backbone and the head train with dropout, whose masks each process draws itself
    ("configs/sst2/fine_tuning.yaml", "readout.linear.weight", 5e-4),
])
def test_ddp_two_processes_match_one(config, weight, atol, tiny, family_files, tmp_path):
    files = family_files["sst2"]
    single, single_score = run(tiny, files, tmp_path / "single", config,
                               ["--trainer.devices", "1", "--data.init_args.batch_size", "4"])
    ddp, ddp_score = run(tiny, files, tmp_path / "ddp", config,
                         ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.batch_size", "2"])
    torch.testing.assert_close(ddp[weight], single[weight], rtol=0, atol=atol)
    assert abs(ddp_score - single_score) < 1e-6
