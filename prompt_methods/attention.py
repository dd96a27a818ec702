"""``grouped``: an attention kernel for training prompts on a CPU.

The same math as a transformers model's eager attention, in fewer passes over the score matrix,
which is what attention costs on a CPU (the matmuls are small; the B x H x T x S scores are read
and written by every elementwise op):

- grouped-query heads attend to their key/value head directly (the queries of a group are stacked
  along the sequence axis), instead of copying keys and values once per query head (``repeat_kv``)
  and summing their gradients back;
- the scaling multiplies the queries (B x H x T x d) rather than the scores (B x H x T x S);
- the softmax runs in the scores' dtype. PyTorch's CPU kernel computes in fp32 internally and
  rounds once, so a bf16 result equals the eager "upcast to fp32, softmax, cast back" to within
  one bf16 step (a few elements in a million differ), without the fp32 copies and their backward;
- under autocast, fp32 queries, keys, values and mask (an fp32 residual stream, ``residual_dtype``)
  are cast to the autocast dtype once, so the scores and softmax stay in it.

Registered with transformers' ``AttentionInterface`` (and the eager mask builder) as ``grouped``;
``attn_implementation: auto`` picks it for decoder-only backbones on CPU. A layer that needs what
the kernel does not do (attention dropout while training, no ``scaling``, a boolean mask, or any
keyword beyond those eager attention ignores: soft-capping, sinks, a position bias, a head mask)
runs its model's own eager attention instead; a GPT-2 layer set to ``reorder_and_upcast_attn`` runs
the fp32 routine its model runs under eager.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "grouped"
#: keyword arguments that eager attention ignores too (the mask already holds causality, windows and
#: packing); a layer passing anything else (soft-capping, sinks, a position bias, a head mask, ...)
#: that is not None gets its model's eager attention
HARMLESS = frozenset({"position_ids", "use_cache", "output_attentions", "cache_position", "sliding_window", "is_causal",
                      "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "layer_idx", "return_dict"})


def _eager(module):
    """The eager attention function of ``module``'s model file (SDPA where the file has none)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", sdpa_attention_forward)


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs):
    """Attention of ``query`` (B, H, T, d) over ``key``/``value`` (B, Hkv, S, d) with an additive
    float mask (B or 1, 1 or H, T, >=S). Returns the output (B, T, H, d) and the probabilities."""
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2 runs this only under "eager"
        return module._upcast_and_reordered_attn(query, key, value, attention_mask)
    b, h, t, d = query.shape
    n, s = key.shape[1], key.shape[2]
    if (scaling is None or (dropout and module.training) or h % n
            or any(v is not None and k not in HARMLESS for k, v in kwargs.items())
            or (attention_mask is not None and attention_mask.dtype == torch.bool)):
        return _eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    g = h // n
    if torch.is_autocast_enabled(query.device.type):  # fp32 queries/keys (an fp32 residual stream): cast once, as
        low = torch.get_autocast_dtype(query.device.type)  # autocast's matmuls would, before the scaling
        query, key, value = query.to(low), key.to(low), value.to(low)
    scores = torch.matmul((query * scaling).reshape(b, n, g * t, d), key.transpose(2, 3))  # (B, Hkv, G*T, S)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :s]
        if mask.dtype.itemsize > scores.dtype.itemsize:  # keep the scores' dtype;
            mask = mask.to(scores.dtype).clamp_min(torch.finfo(scores.dtype).min)  # fp32's min would round to -inf
        mask = mask.unsqueeze(1) if mask.shape[1] == 1 else mask.reshape(mask.shape[0], n, g, t, s)
        grouped = scores.view(b, n, g, t, s)
        in_place = not torch.is_grad_enabled() and mask.dtype == scores.dtype  # else a wider mask dtype wins
        scores = (grouped.add_(mask) if in_place else grouped + mask).view(b, n, g * t, s)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value).view(b, h, t, value.size(-1)).transpose(1, 2).contiguous()  # as eager's
    return out, probs.view(b, h, t, s)


AttentionInterface.register(NAME, grouped_attention)
AttentionMaskInterface.register(NAME, eager_mask)
