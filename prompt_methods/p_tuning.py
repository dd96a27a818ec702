"""P-tuning.

"GPT Understands, Too" (Liu et al., arXiv:2103.10385). Pseudo tokens at the template's ``{soft}``
slots come from a prompt encoder (a bidirectional LSTM + MLP, or an MLP) over trainable
embeddings; hard anchor tokens of the template stay as they are. The encoder runs once per step,
not per example.
"""

from __future__ import annotations

import torch
from torch import nn

from prompt_methods.base import PromptModule


class PromptEncoder(nn.Module):
    """Maps N trainable embeddings to N prompt vectors.

    Args:
        num_tokens: N.
        hidden_size: backbone hidden size H (input and output width).
        kind: ``lstm`` (2-layer bidirectional LSTM, then a 2-layer MLP, as in the paper) or ``mlp``.
        encoder_hidden: width inside the encoder.
    """

    def __init__(self, num_tokens: int, hidden_size: int, kind: str = "lstm", encoder_hidden: int = 256):
        super().__init__()
        if kind not in ("lstm", "mlp"):
            raise ValueError(f"model.init_args.encoder: '{kind}' is not lstm or mlp")
        if encoder_hidden < 1 or (kind == "lstm" and encoder_hidden % 2):
            raise ValueError(f"model.init_args.encoder_hidden: {encoder_hidden} must be "
                             + ("an even number: the bidirectional LSTM gives each direction half of it" if kind == "lstm"
                                else "at least 1"))
        self.embedding = nn.Embedding(num_tokens, hidden_size)
        self.lstm = None
        width = hidden_size
        if kind == "lstm":
            self.lstm = nn.LSTM(hidden_size, encoder_hidden // 2, num_layers=2, bidirectional=True, batch_first=True)
            width = encoder_hidden
        self.mlp = nn.Sequential(nn.Linear(width, encoder_hidden), nn.ReLU(), nn.Linear(encoder_hidden, hidden_size))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (N, H)
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0][0]  # (N, encoder_hidden)
        return self.mlp(x)  # (N, H)


class PTuning(PromptModule):
    """Pseudo tokens from a prompt encoder, at the template's ``{soft}`` slots (or before the input).

    Args:
        num_virtual_tokens: number of pseudo tokens; must equal the template's ``{soft}`` count if it has any.
        encoder: ``lstm`` or ``mlp``.
        encoder_hidden: width inside the prompt encoder.
        **kwargs: the rest of :class:`PromptModule` (``tune_backbone: true`` tunes the backbone too).

    Trainable parameters (lstm, H hidden, E encoder_hidden, N tokens):
    ``N*H + 2 LSTM layers + (E*E + E) + (E*H + H)``.
    """

    method_params = ("prompt_encoder",)

    def __init__(self, num_virtual_tokens: int = 6, encoder: str = "lstm", encoder_hidden: int = 256, **kwargs):
        super().__init__(**kwargs)
        if num_virtual_tokens < 1:
            raise ValueError("model.init_args.num_virtual_tokens must be at least 1")
        self.prompt_encoder = PromptEncoder(num_virtual_tokens, self.hidden_size, encoder, encoder_hidden)

    def feed(self, batch):
        return self.feed_with_prompt(batch, self.prompt_encoder(), "model.init_args.num_virtual_tokens")
