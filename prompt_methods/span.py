"""Extractive answers: a start/end span head for encoder backbones (BERT-style SQuAD readout).

Prompt vectors prepended by a method shift every position; the head drops those positions first
(``Feed.prepended``), so start/end logits stay aligned with the tokens the offsets describe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prompt_methods.readout import Feed, base_forward


class SpanHead(nn.Module):
    """Start and end logits over the input tokens.

    Args:
        hidden_size: backbone hidden size.
        max_answer_tokens: the longest span considered when predicting.
    """

    def __init__(self, hidden_size: int, max_answer_tokens: int = 30):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2)
        self.max_answer_tokens = max_answer_tokens

    def logits(self, backbone, feed: Feed, context_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = base_forward(backbone, feed).last_hidden_state[:, feed.prepended:]  # (B, T, H) original tokens
        logits = self.linear(hidden.to(self.linear.weight.dtype)).float()  # (B, T, 2)
        logits = logits.masked_fill(~context_mask.unsqueeze(-1), torch.finfo(logits.dtype).min)
        return logits[..., 0], logits[..., 1]

    def loss(self, backbone, feed: Feed, batch: dict) -> torch.Tensor:
        start, end = self.logits(backbone, feed, batch["context_mask"])
        return (F.cross_entropy(start, batch["span_start"]) + F.cross_entropy(end, batch["span_end"])) / 2

    @torch.no_grad()
    def predict(self, backbone, feed: Feed, batch: dict) -> list[str]:
        """The best span (start <= end < start + max_answer_tokens) of context tokens, as text cut from
        the context. Training may aim at the first position where truncation cut the answer off, but a
        prediction starts and ends on context tokens (a span from there into the context has no text)."""
        start, end = self.logits(backbone, feed, batch["context_mask"])
        B, T = start.shape
        scores = start.unsqueeze(2) + end.unsqueeze(1)  # (B, T, T): start i, end j
        context = torch.zeros(B, T, dtype=torch.bool, device=scores.device)
        for b, offsets in enumerate(batch["offsets"]):
            context[b, [i for i in offsets if i < T]] = True
        allowed = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu().tril(self.max_answer_tokens - 1)
        allowed = allowed & context.unsqueeze(2) & context.unsqueeze(1)  # (B, T, T)
        best = scores.masked_fill(~allowed, -float("inf")).flatten(1).argmax(-1)
        answers = []
        for b, flat in enumerate(best.tolist()):
            i, j = divmod(flat, T)
            offsets = batch["offsets"][b]
            answers.append(batch["context"][b][offsets[i][0]:offsets[j][1]] if i in offsets and j in offsets else "")
        return answers
