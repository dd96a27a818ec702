"""What trains and how: freezing by parameter name, and the optimizer every method shares (AdamW
over the trainable parameters, fused where torch has the kernel, with linear warm-up and linear
decay to zero over the run's steps)."""

from __future__ import annotations

import torch
from torch import nn


def freeze_except(module: nn.Module, trainable: set[str]) -> None:
    """Freeze every parameter of ``module`` whose name does not start with one of ``trainable``."""
    for name, param in module.named_parameters():
        param.requires_grad_(any(name == t or name.startswith(t + ".") for t in trainable))


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def check_trainable(module: nn.Module) -> None:
    """Refuse to fit a module with nothing to train (a frozen backbone and a method without parameters)."""
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(
            f"{type(module).__name__} has nothing to train with a frozen backbone: run `validate`/`test` for "
            "zero-shot, or set model.init_args.tune_backbone: true"
        )


def fused_adamw_fits(params) -> bool:
    """Whether torch has a fused AdamW kernel for every one of ``params`` (floating point, on a device
    with the kernel: CPU, CUDA and others). The fused step updates each parameter in one pass instead
    of a dozen elementwise calls: for SmolLM2's 134.5M parameters on a 2-core CPU, 0.05-0.07 s against
    0.41 s per step (``benchmarks/optimizer_step.py``); it matches the unfused update to rounding."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch that moved the helper: the two devices it has always covered
        devices = {"cpu", "cuda"}
    params = list(params)
    return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)


def adamw(params, lr: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors or parameter groups), fused where :func:`fused_adamw_fits`."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused and fused_adamw_fits(tensors) else {}))


def adamw_with_schedule(module: nn.Module, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int,
                        fused: bool = True) -> dict:
    """Lightning's ``configure_optimizers`` answer for ``module``: matrices decay, vectors and norms do not.
    ``fused``: the fused AdamW kernel where there is one (:func:`adamw`).

    A module with nothing to train is refused before, at ``setup("fit")`` (:func:`check_trainable`).
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = adamw([g for g in groups if g["params"]], lr, fused)
    total = max(1, int(total_steps))
    warmup = int(warmup_ratio * total)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
