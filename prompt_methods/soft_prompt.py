"""Soft prompt tuning.

"The Power of Scale for Parameter-Efficient Prompt Tuning" (Lester et al., arXiv:2104.08691).
N learned vectors in the input embedding space; the backbone stays frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from prompt_methods.base import PromptModule
from prompt_methods.peft_format import check_adapter, read_adapter

INITS = ("random", "vocab", "text")


def vocab_rows(table: torch.Tensor, n: int, seed: int | None, vocab_ids: int | None) -> torch.Tensor:
    """``init: vocab``: the embeddings (``table``, V x H) of ``n`` token ids drawn uniformly from the
    vocabulary (or its ``vocab_ids`` lowest ids) by a generator seeded with ``seed`` (by default the
    run's seed). The PEFT peer draws its soft prompt here too, so both start from the same prompt."""
    if vocab_ids is not None and vocab_ids < 1:
        raise ValueError("model.init_args.init_vocab_ids must be at least 1, or null for the whole vocabulary")
    gen = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
    high = table.size(0) if vocab_ids is None else min(vocab_ids, table.size(0))
    return table[torch.randint(0, high, (n,), generator=gen)].clone()


class SoftPrompt(PromptModule):
    """N learned prompt vectors, before the input or at the template's ``{soft}`` slots.

    Args:
        num_virtual_tokens: N, the number of vectors; must equal the template's ``{soft}`` count if it has any.
        init: ``random`` (normal, scaled like the embeddings), ``vocab`` (embeddings of tokens sampled from
            the vocabulary, or its ``init_vocab_ids`` lowest ids) or ``text``.
        init_vocab_ids: sample ``vocab`` rows from the N lowest token ids only (Lester et al. use the 5,000
            most frequent tokens; low BPE ids are often frequent ones). ``null`` (default) samples the whole
            vocabulary, as PEFT's SAMPLE_VOCAB does: on SST-2 with SmolLM2 the 5,000-id range collapsed on one
            of three seeds (58.5%), the whole vocabulary on none (``configs/benchmark/soft_init.yaml``).
        init_text: text whose token embeddings, repeated or cut to N, start the prompt (``init: text``).
        init_seed: seed for ``random`` and ``vocab``; by default the run's seed (``seed_everything``),
            so runs with different seeds start from different prompts.
        adapter: a PEFT adapter folder (prompt tuning, or P-tuning, whose saved vectors are its encoder's
            output) to start from, e.g. to evaluate a prompt trained with PEFT; N then comes from it.
        **kwargs: the rest of :class:`PromptModule`.

    Trainable parameters: ``num_virtual_tokens * hidden_size``.
    """

    method_params = ("prompt",)

    def __init__(self, num_virtual_tokens: int = 20, init: str = "vocab", init_text: str | None = None,
                 init_seed: int | None = None, init_vocab_ids: int | None = None, adapter: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if adapter:
            config, vectors = read_adapter(adapter)
            check_adapter(config, vectors, ("PROMPT_TUNING", "P_TUNING"), self.hidden_size, None)
            self.prompt = nn.Parameter(vectors.clone())
            self.count_key = f"the prompt of model.init_args.adapter ({adapter})"
            return
        if num_virtual_tokens < 1:
            raise ValueError("model.init_args.num_virtual_tokens must be at least 1")
        if init not in INITS:
            raise ValueError(f"model.init_args.init: '{init}' is not one of {', '.join(INITS)}")
        if init == "text" and not init_text:
            raise ValueError("model.init_args.init_text is required with init: text")
        table = self.backbone.get_input_embeddings().weight.detach().float()  # (V, H)
        if init == "random":
            gen = torch.Generator().manual_seed(torch.initial_seed() if init_seed is None else init_seed)
            vectors = torch.randn(num_virtual_tokens, table.size(1), generator=gen) * table.std()
        elif init == "vocab":
            vectors = vocab_rows(table, num_virtual_tokens, init_seed, init_vocab_ids)
        else:
            vectors = table[self.text_ids(init_text, num_virtual_tokens)]
        self.prompt = nn.Parameter(vectors.clone())  # (N, H), fp32 whatever the backbone dtype

    def feed(self, batch):
        return self.feed_with_prompt(batch, self.prompt, getattr(self, "count_key", "model.init_args.num_virtual_tokens"))
