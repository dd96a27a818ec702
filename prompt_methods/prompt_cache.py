"""Key/value caches that hold a prompt every example of a batch shares.

Prefix tuning hands the backbone learned keys/values this way. Soft prompt tuning and P-tuning
with their vectors *before* the input on a causal LM can use it too: those N positions attend
only to each other (causal attention), sit at positions 0..N-1 in every example (positions skip
the left padding), and hold the same vectors, so their keys/values are the same in every example
of the batch. :func:`shared_prompt_cache` computes them once, at batch size 1, and the batch
attends to them like to a prefix. The scores are those of running the prompt in every row (the
tests compare losses and gradients); the backbone's work per batch falls from B * (N + T)
positions to N + B * T, and backward goes through the prompt once, where the B examples' gradients
meet.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


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


def shared_prompt_cache(backbone, kind: str, prompt: torch.Tensor, batch_size: int) -> DynamicCache:
    """Run the backbone once over the prompt vectors (N, H) at positions 0..N-1 and return their
    keys/values of every layer, expanded to ``batch_size`` examples. Gradients flow back to ``prompt``."""
    n = prompt.size(0)
    cache = new_cache(backbone, kind)
    positions = torch.arange(n, device=prompt.device).unsqueeze(0)
    mask = torch.ones(1, n, dtype=torch.long, device=prompt.device)
    backbone.base_model(inputs_embeds=prompt.unsqueeze(0), attention_mask=mask, position_ids=positions,
                        past_key_values=cache, use_cache=True)  # fills ``cache``
    return expanded_cache(backbone, kind, [(layer.keys, layer.values) for layer in cache.layers], batch_size)
