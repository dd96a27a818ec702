"""Task metrics over a whole validation or test epoch (SemEval macro-F1, SQuAD EM/F1), gathered
across processes. Accuracy is a torchmetrics metric in the module; these need every prediction."""

from __future__ import annotations

import torch
import lightning as L
from torchmetrics import Metric

from tasks.metrics import METRICS


def log_epoch_metric(module: L.LightningModule, split: str, outputs: list[tuple]) -> torch.Tensor:
    """Score an epoch's ``(predictions, golds)`` batches with ``module.metric`` and log
    ``<split>/<name>`` for each value and ``<split>/score`` for the main one (what checkpoints monitor).

    Predictions are gathered as objects (text answers, or label indices mapped to ``module.labels``):
    under DDP the processes' shares of a split differ by up to one example. Accuracy tasks keep no outputs and use ``<split>_acc``.
    """
    if module.text_answers:
        preds, golds = [p for ps, _ in outputs for p in ps], [g for _, gs in outputs for g in gs]
        world = module.trainer.world_size
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, (preds, golds))
            preds, golds = [p for ps, _ in gathered for p in ps], [g for _, gs in gathered for g in gs]
        values = METRICS[module.metric](preds, golds) if preds else {"em": 0.0, "f1": 0.0}
        for name, value in values.items():
            module.log(f"{split}/{name}", value)
        score = torch.tensor(values.get("f1", next(iter(values.values()))))
        module.log(f"{split}/score", score)
        return score
    preds = torch.cat([p for p, _ in outputs]).tolist() if outputs else []
    golds = torch.cat([g for _, g in outputs]).tolist() if outputs else []
    if module.metric != "accuracy" and module.trainer.world_size > 1:  # every process gathers, an empty share
        gathered = [None] * module.trainer.world_size  # too (shares differ by up to one example: EvalSampler)
        torch.distributed.all_gather_object(gathered, (preds, golds))
        preds, golds = [p for ps, _ in gathered for p in ps], [g for _, gs in gathered for g in gs]
    if module.metric == "accuracy" or not preds:
        score = module.metrics[f"{split}_acc"].compute()
        module.log(f"{split}/score", score)
        return score
    values = METRICS[module.metric]([module.labels[i] for i in preds], [module.labels[i] for i in golds])
    for name, value in values.items():
        if name != "acc":
            module.log(f"{split}/{name}", value, rank_zero_only=True)
    score = torch.tensor(next(iter(values.values())))
    module.log(f"{split}/score", score, rank_zero_only=True)
    return score


class WeightedMean(Metric):
    """The mean of per-batch values weighted by batch size, summed and counted across processes (so
    unequal shares weigh what they hold); a NaN stays NaN."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int) -> None:
        self.total += value.detach().float() * weight
        self.count += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.count
