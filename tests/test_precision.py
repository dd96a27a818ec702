"""bf16-mixed on CPU for every method: frozen backbones run in bf16, method parameters stay fp32."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from test_methods import METHODS


@pytest.mark.parametrize("name", [n for n in METHODS if n != "hard_prompt"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_bf16_mixed_fit(name, arch, tiny, make_data):
    cls, kwargs = METHODS[name]
    backbone = tiny(arch)
    dm = make_data(backbone)
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, **kwargs)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", fast_dev_run=True, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    backbone_dtype = next(model.backbone.parameters()).dtype
    assert backbone_dtype == (torch.float32 if model.tune_backbone else torch.bfloat16)
    for n, p in model.named_parameters():
        if p.requires_grad and not n.startswith("backbone."):
            assert p.dtype == torch.float32, n
