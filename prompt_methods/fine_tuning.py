"""Full fine-tuning: the baseline every prompt method is compared against.

"BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"
(Devlin et al., arXiv:1810.04805): a new classification head on the answer position
(``[MASK]``/first token for encoders, the last token for causal LMs), whole backbone trained.
"""

from __future__ import annotations

from prompt_methods.base import PromptModule


class FineTuning(PromptModule):
    """Trains the whole backbone plus a classification head.

    Args:
        readout: ``head`` (default, the classic baseline) or ``label_words``; for text answers the
            head is a span head (encoders) or the LM generating (decoders), as ``auto`` picks.
        lr: AdamW learning rate; full fine-tuning wants a small one.
        **kwargs: the rest of :class:`PromptModule`; ``tune_backbone`` is always on.
    """

    def __init__(self, readout: str = "head", lr: float = 2e-5, **kwargs):
        kwargs.pop("tune_backbone", None)
        if readout == "head" and not kwargs.get("verbalizer"):
            readout = "auto"  # text answers
        super().__init__(readout=readout, lr=lr, tune_backbone=True, **kwargs)
