"""The real packaged SmolLM2-135M (converted from GGUF once, then cached). Marked slow."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_zero_shot_sst2_beats_chance(data_dir):
    from datamodules import ClassificationDataModule
    from prompt_methods import HardPrompt

    dm = ClassificationDataModule(task="sst2", data_dir=data_dir, max_train_samples=16, max_eval_samples=96,
                                  eval_batch_size=32)
    dm.setup()
    model = HardPrompt(verbalizer=dm.verbalizer)
    model.configure_trainable()
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in dm.val_dataloader():
            correct += (model(batch).argmax(-1) == batch["labels"]).sum().item()
    assert correct / 96 > 0.65  # the hand-written template is far above chance on SST-2 dev


def test_soft_prompt_cli_runs_on_packaged_model(data_dir, tmp_path, monkeypatch):
    import train
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cli = train.main(["fit", "--config", "configs/sst2/soft_prompt.yaml", "--trainer.fast_dev_run", "2",
                      "--data.init_args.data_dir", data_dir, "--data.init_args.max_train_samples", "64",
                      "--data.init_args.max_eval_samples", "64", "--data.init_args.batch_size", "8",
                      "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert next(cli.model.backbone.parameters()).dtype == torch.bfloat16  # frozen backbone kept in bf16
    assert cli.model.prompt.dtype == torch.float32
