"""Batching: pad encoded items to the longest one, with whatever answers they carry."""

from __future__ import annotations

import torch


def pad_batch(items: list[dict], pad_id: int, left: bool) -> dict:
    """Pad items (from ``PromptDataModule.encode_row``) into one batch.

    Prompts are padded on the left for causal backbones (``left``), so the answer sits at the last
    position, and on the right otherwise. Keys of the batch (B items, T the longest prompt):

    - ``input_ids``, ``soft_index`` (-1 outside ``{soft}`` slots), ``attention_mask``: (B, T);
      ``answer_pos`` (B,): the answer position after padding; ``ids``: the item ids;
    - ``labels`` (B,) when every item has a label;
    - extractive answers (right padding, so positions are unchanged): ``span_start``/``span_end`` (B,),
      ``context_mask`` (B, T) marking context tokens and position 0 ("no answer in the kept text"),
      ``offsets``, ``context`` and ``answers`` per item;
    - generated answers: ``target_ids``/``target_mask`` (B, A), padded on the right, and ``answers``.
    """
    B = len(items)
    length = max(len(it["input_ids"]) for it in items)
    batch = {k: torch.full((B, length), v, dtype=torch.long) for k, v in (("input_ids", pad_id), ("soft_index", -1), ("attention_mask", 0))}
    answer = []
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        sl = slice(length - n, length) if left else slice(0, n)
        batch["input_ids"][i, sl] = torch.tensor(it["input_ids"])
        batch["soft_index"][i, sl] = torch.tensor(it["soft_index"])
        batch["attention_mask"][i, sl] = 1
        answer.append(it["answer_pos"] + (length - n if left else 0))
    batch["answer_pos"] = torch.tensor(answer)
    if all("label" in it for it in items):
        batch["labels"] = torch.tensor([it["label"] for it in items])
    if all("span" in it for it in items):
        batch["span_start"] = torch.tensor([it["span"][0] for it in items])
        batch["span_end"] = torch.tensor([it["span"][1] for it in items])
        batch["context_mask"] = torch.zeros((B, length), dtype=torch.bool)
        for i, it in enumerate(items):
            batch["context_mask"][i, list(it["offsets"])] = True
            batch["context_mask"][i, 0] = True
        batch["offsets"] = [it["offsets"] for it in items]
        batch["context"] = [it["context"] for it in items]
        batch["answers"] = [it["answers"] for it in items]
    if all("target_ids" in it for it in items):
        width = max(len(it["target_ids"]) for it in items)
        batch["target_ids"] = torch.full((B, width), pad_id, dtype=torch.long)
        batch["target_mask"] = torch.zeros((B, width), dtype=torch.long)
        for i, it in enumerate(items):
            batch["target_ids"][i, : len(it["target_ids"])] = torch.tensor(it["target_ids"])
            batch["target_mask"][i, : len(it["target_ids"])] = 1
        batch["answers"] = [it["answers"] for it in items]
    batch["ids"] = [it["id"] for it in items]
    return batch
