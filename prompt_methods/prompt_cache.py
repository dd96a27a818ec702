"""Key/value caches for prompts that every example of a batch shares.

Prefix tuning hands the backbone learned keys/values in a cache (:func:`expanded_cache`).

Soft prompt tuning and P-tuning with their N vectors *before* the input, on a causal LM, can share
work the same way: those positions attend only to each other (causal attention), sit at positions
0..N-1 in every example (positions skip the left padding) and hold the same vectors, so their
keys/values are the same in every row. Instead of running them in each of the B rows, the batch
gets one extra row holding the prompt (a :class:`PromptRow`); at every layer a
:class:`PromptRowLayer` takes that row's prompt keys/values and puts them in front of every other
row's, as a prefix. One pass over (B + 1) rows of max(T, N) positions replaces B rows of N + T
(SST-2, batch 8, N = 20: about 180 positions instead of 296); it is used where it saves at least
``ROW_SAVING`` of the positions (short inputs). The same holds for the template's leading part
that every row starts with (P-tuning's leading ``{soft}`` slots and text such as "Review:"), so
that part joins the shared row too (``feeding.shared_lead``). A separate batch-1 pass over the
prompt was tried first: on a CPU it costs a whole extra read of the weights and the per-layer
overhead, most of what it saves on a short batch. The scores, loss and gradient are those of
running the prompt in every row (the tests compare them).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: the keyword a model's forward takes its key/value cache under, newest first: transformers 5.24
#: renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40)
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(model) -> str | None:
    """The keyword under which ``model.forward`` takes a key/value cache (``CACHE_KEYWORDS``), or
    None where it takes none, so prompts reach the backbone under whichever name its release uses."""
    return _forward_cache_keyword(type(model).forward)


@functools.lru_cache(maxsize=None)
def _forward_cache_keyword(forward) -> str | None:
    params = inspect.signature(forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in params), None)


def output_cache(out):
    """The cache a transformers model output returns (``cache`` from 5.24 on, ``past_key_values``
    before), or None."""
    for name in CACHE_KEYWORDS:
        if name in out:  # a ModelOutput holds only its fields that are set
            return out[name]
    return None


def new_cache(backbone, kind: str) -> DynamicCache:
    """An empty transformers cache for ``backbone`` (``kind`` from :func:`backbone.resolve_kind`)."""
    return DynamicCache(config=backbone.config) if kind == "causal" else DynamicCache()


def expanded_cache(backbone, kind: str, layers: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> DynamicCache:
    """A fresh cache whose layer ``i`` holds ``layers[i]`` (keys, values of shape (1 or B, kv, N, hd))
    expanded over the batch (a view: no copy until the batch's own keys are appended)."""
    cache = new_cache(backbone, kind)
    for i, (keys, values) in enumerate(layers):
        cache.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1), i)
    return cache


@dataclass
class PromptRow:
    """The extra first row of a batch that holds a shared prompt.

    Attributes:
        inputs_embeds: (1, T, H) left padding, then the N prompt vectors.
        attention_mask: (1, N + T): N masked places (where the other rows see the prompt), then its own.
        position_ids: (1, T): the prompt at 0..N-1.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def extended(self, n: int) -> PromptRow:
        """The row for a batch whose rows got ``n`` more tokens: ``n`` masked places appended."""
        embeds = self.inputs_embeds
        return PromptRow(torch.cat([embeds, embeds.new_zeros(1, n, embeds.size(-1))], 1),
                         torch.cat([self.attention_mask, self.attention_mask.new_zeros(1, n)], 1),
                         torch.cat([self.position_ids, self.position_ids.new_zeros(1, n)], 1))


class PromptRowLayer(DynamicLayer):
    """A cache layer whose first update takes the prompt row's keys/values (row 0, places
    ``start .. start + n``) and puts them before every row's own, as an n-long prefix (row 0 gets
    masked zeros there). Until then it reports n cached positions, so masks and positions are built
    for an n-long prefix. Later updates (continuations, generation) append as usual."""

    def __init__(self, n: int, start: int, rows: int):
        super().__init__()
        self.n, self.start, self.rows, self.pending = n, start, rows, True

    def get_seq_length(self) -> int:
        return self.n if self.pending else super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.pending:
            return super().update(key_states, value_states, *args, **kwargs)
        if key_states.size(0) != self.rows:
            raise RuntimeError(f"a shared-prompt cache expects {self.rows} rows (the prompt row first), got {key_states.size(0)}")
        self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self._with_prefix(key_states), self._with_prefix(value_states)
        self.pending = False
        return self.keys, self.values

    def _with_prefix(self, states: torch.Tensor) -> torch.Tensor:
        prompt = states[:1, :, self.start:self.start + self.n]  # (1, kv, n, hd)
        prefix = torch.cat([torch.zeros_like(prompt), prompt.expand(self.rows - 1, -1, -1, -1)], 0)
        return torch.cat([prefix, states], -2)


def prompt_row_cache(backbone, n: int, start: int, rows: int) -> DynamicCache | None:
    """A cache of :class:`PromptRowLayer` for ``backbone``, or None where its layers are not plain
    full-attention layers (sliding windows and the like keep the prompt in every row)."""
    cache = DynamicCache(config=backbone.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [PromptRowLayer(n, start, rows) for _ in cache.layers]
    return cache


#: the shared row is used when it saves at least this share of the positions: the row adds a key/value
#: copy per layer. On SQuAD evaluation batches (32 x ~200 tokens, 6% fewer positions) it was no faster;
#: on SST-2 P-tuning batches of 8 (11% fewer) the train step was 4% faster (benchmarks/shared_prompt.py)
ROW_SAVING = 0.1


def prompt_row_pays(batch_size: int, length: int, n: int) -> bool:
    """Whether (B + 1) rows of max(T, N) positions save ``ROW_SAVING`` of B rows of N + T."""
    return (batch_size + 1) * max(length, n) <= (1 - ROW_SAVING) * batch_size * (n + length)
