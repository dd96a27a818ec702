"""Surviving a kill: a real ``train.py fit`` process is SIGKILLed after it has written a checkpoint,
resumed with ``--ckpt_path``, and finishes with the same prompt and metric as an uninterrupted run,
whether the checkpoint was written at an epoch's end or in its middle."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 45  # 15 epochs of the 6 tiny training rows at batch 2


def command(tiny, files, run_dir: Path, extra=(), every: int = 3) -> list[str]:
    return [sys.executable, "train.py", "fit", "--config", "configs/sst2/soft_prompt.yaml",
            "--model.init_args.backbone", tiny("llama"), "--trainer.precision", "32-true",
            "--data.init_args.train_file", files["train"], "--data.init_args.validation_file", files["validation"],
            "--data.init_args.test_file", files["test"], "--data.init_args.batch_size", "2",
            "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(every),  # validate + checkpoint
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run_dir),
            *extra]


def env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def last_val_score(run_dir: Path) -> float:
    rows = []
    for path in sorted(run_dir.glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("val/score")]
    return float(max(rows, key=lambda r: int(r["step"]))["val/score"])


def last_checkpoint(run_dir: Path) -> Path | None:
    """``last.ckpt`` of the newest run in ``run_dir`` (a resumed run logs into a new version folder)."""
    found = sorted(run_dir.glob("version_*/checkpoints/last.ckpt"), key=lambda p: int(p.parts[-3].split("_")[1]))
    return found[-1] if found else None


def final_prompt(run_dir: Path) -> tuple[torch.Tensor, int]:
    ckpt = torch.load(last_checkpoint(run_dir), weights_only=True)
    return ckpt["state_dict"]["prompt"], ckpt["global_step"]


@pytest.mark.parametrize("every", [3, 2], ids=["epoch-end", "mid-epoch"])
def test_sigkill_then_resume_matches_uninterrupted(every, tiny, family_files, tmp_path):
    """3 batches per epoch: validating (and checkpointing) every 3 batches saves at epoch ends, every
    2 batches after the second batch of each epoch, where the resumed run must skip the two batches
    already trained on, not replay the epoch."""
    files = family_files["sst2"]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command(tiny, files, ref_dir, every=every), cwd=ROOT, env=env(), check=True, capture_output=True)

    proc = subprocess.Popen(command(tiny, files, run_dir, every=every), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while last_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    _, killed_at = final_prompt(run_dir)
    assert 0 < killed_at < STEPS
    assert (killed_at % 3 == 0) == (every == 3)  # where in the epoch the checkpoint was written

    subprocess.run(command(tiny, files, run_dir, ["--ckpt_path", str(last_checkpoint(run_dir))], every), cwd=ROOT, env=env(), check=True,
                   capture_output=True)
    resumed, step = final_prompt(run_dir)
    reference, ref_step = final_prompt(ref_dir)
    assert step == ref_step == STEPS
    torch.testing.assert_close(resumed, reference, rtol=0, atol=1e-6)
    assert abs(last_val_score(run_dir) - last_val_score(ref_dir)) < 1e-6
