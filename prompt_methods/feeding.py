"""How a batch becomes the backbone's inputs (a :class:`~prompt_methods.readout.Feed`).

:class:`Feeding` is the part of :class:`~prompt_methods.base.PromptModule` that embeds the tokens,
numbers the positions around left padding and puts prompt vectors in place: at the template's
``{soft}`` slots, before the input, or (on a frozen causal backbone) once per batch, in a shared
row whose keys/values every row attends to (:mod:`prompt_methods.prompt_cache`). Methods override ``feed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prompt_methods import runtime
from prompt_methods.prompt_cache import PromptRow, prompt_row_cache, prompt_row_pays
from prompt_methods.readout import Feed, position_base


class Feeding:
    """Mixed into :class:`~prompt_methods.base.PromptModule`; uses its ``backbone``, ``kind``,
    ``tune_backbone``, ``compile_layers``, ``share_prompt`` and ``fp32_stream``."""

    def embed(self, batch: dict) -> torch.Tensor:
        """(B, T, H) token embeddings; a batch may carry ``inputs_embeds`` instead of ids."""
        if "inputs_embeds" in batch:
            return self.stream(batch["inputs_embeds"])
        return self.stream(self.backbone.get_input_embeddings()(batch["input_ids"]))

    def stream(self, embeds: torch.Tensor) -> torch.Tensor:
        """The embeddings in the dtype the backbone's hidden states are carried in between its layers.

        Under autocast a 16-bit backbone (``backbone_dtype: auto`` with ``bf16-mixed``) still runs its
        matmuls in bf16, but fp32 inputs (and its norms' weights kept in fp32, see ``setup``) keep the
        residual stream, the adds and norms between the matmuls, in fp32, as autocast over fp32
        weights would (``residual_dtype: float32``, the default). A bf16 stream rounds what every
        layer adds to it: the soft prompt's gradient, read at the first positions, then points
        elsewhere than the fp32 model's (``benchmarks/residual_stream.py``).
        """
        if self.fp32_stream and torch.is_autocast_enabled(embeds.device.type):
            return embeds.float()
        return embeds

    def position_ids(self, attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor | None:
        """(B, T) positions that skip left padding, from ``offset`` (after the backbone's own first
        position, :func:`~prompt_methods.readout.position_base`); None for encoder-decoders."""
        if self.kind == "seq2seq":
            return None
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset + position_base(self.backbone)

    def feed(self, batch: dict) -> Feed:
        """Turn a batch into backbone inputs. Methods override this; the base feeds the hard prompt."""
        if (batch["soft_index"] >= 0).any():
            raise ValueError(
                f"data.init_args.template has {{soft}} slots, but {type(self).__name__} has no learnable tokens; "
                "use a template without {soft:N} or a soft-prompt method"
            )
        mask = batch["attention_mask"]
        return Feed(self.embed(batch), mask, batch["answer_pos"], self.position_ids(mask))

    def shares_prompt(self) -> bool:
        """Whether prompt vectors before the input may run as one shared row per batch
        (:mod:`prompt_methods.prompt_cache`): on a frozen causal backbone, unless switched off or
        compiled (the cache would make every layer compile anew), or while gradient checkpointing would
        drop the row's cache (:func:`~prompt_methods.runtime.checkpointed_pass`): the prompt then
        runs in every row, with the same result."""
        return (self.share_prompt and self.kind == "causal" and not self.tune_backbone and not self.compile_layers
                and not runtime.checkpointed_pass(self.backbone))

    def feed_with_prompt(self, batch: dict, prompt: torch.Tensor, key: str) -> Feed:
        """Put N prompt vectors (N, H) into the batch: at the template's ``{soft}`` slots if it has
        any, else before the input (Lester et al.): in every row, or (:meth:`shares_prompt`) once,
        in a shared row, together with the template's leading part that every row starts with,
        where that computes fewer positions. ``key`` names the count in errors."""
        embeds = self.embed(batch)  # (B, T, H)
        prompt = prompt.to(embeds.dtype)
        mask, answer, slots = batch["attention_mask"], batch["answer_pos"], batch["soft_index"]
        n_slots = int(slots.max()) + 1
        if n_slots > 0 and n_slots != prompt.size(0):
            raise ValueError(
                f"data.init_args.template has {n_slots} {{soft}} slots but {key} is {prompt.size(0)}; make them equal"
            )
        if self.shares_prompt():
            feed = self._feed_sharing_lead(batch, embeds, prompt if n_slots <= 0 else prompt[:0], prompt)
            if feed is not None:
                return feed
        if n_slots > 0:
            embeds = fill_slots(embeds, slots, prompt)
        else:
            B = embeds.size(0)
            embeds = torch.cat([prompt.unsqueeze(0).expand(B, -1, -1), embeds], 1)  # (B, N + T, H)
            mask = torch.cat([mask.new_ones(B, prompt.size(0)), mask], 1)
            answer = answer + prompt.size(0)
        return Feed(embeds, mask, answer, self.position_ids(mask), prepended=int(embeds.size(1) - slots.size(1)))

    def _feed_sharing_lead(self, batch: dict, embeds: torch.Tensor, before: torch.Tensor, prompt: torch.Tensor) -> Feed | None:
        """The batch with one shared first row holding the vectors ``before`` the input and the k
        leading tokens/slots that every row starts with (:func:`shared_lead`), which leave the
        rows; None where that is not fewer positions (``prompt_row_pays``)."""
        mask, answer, slots = batch["attention_mask"], batch["answer_pos"], batch["soft_index"]
        (B, T), n = mask.shape, before.size(0)
        # rows are max(T - k, n + k) wide: moving more than evens the two out does not pay, and if even
        # the longest lead worth moving would not pay, the rows need not be compared at all
        most = max(0, (T - n + 1) // 2) if "input_ids" in batch else 0
        if n + most == 0 or not prompt_row_pays(B, T - most, n + most):
            return None
        k = shared_lead(batch, most) if most else 0
        if n + k == 0 or not prompt_row_pays(B, T - k, n + k):
            return None
        if k:
            start = T - mask.sum(1)  # (B,) where each row's tokens begin
            lead = fill_slots(embeds[:1, start[0]:start[0] + k], slots[:1, start[0]:start[0] + k], prompt)[0]
            cols = torch.arange(T, device=mask.device)
            in_lead = (cols >= start[:, None]) & (cols < start[:, None] + k)  # becomes padding; then the
            mask, slots = mask.masked_fill(in_lead, 0)[:, k:], slots.masked_fill(in_lead, -1)[:, k:]  # first k
            embeds, answer = embeds[:, k:], answer - k  # columns are padding in every row and go
            before = torch.cat([before, lead], 0)
        if (slots >= 0).any():
            embeds = fill_slots(embeds, slots, prompt)
        return self._feed_with_prompt_row(embeds, mask, answer, before, dropped=k)

    def _feed_with_prompt_row(self, embeds: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor,
                              prompt: torch.Tensor, dropped: int = 0) -> Feed | None:
        """The batch's rows (left-padded to at least N places) with the prompt as a shared first row;
        ``dropped`` leading tokens of every row are part of that prompt."""
        (B, T), n = mask.shape, prompt.size(0)
        width = max(T, n)
        cache = prompt_row_cache(self.backbone, n, width - n, B + 1)
        if cache is None:
            return None
        if width > T:  # the prompt row needs N places: pad the batch's rows on the left to match
            embeds = torch.cat([embeds.new_zeros(B, width - T, embeds.size(-1)), embeds], 1)
            mask = torch.cat([mask.new_zeros(B, width - T), mask], 1)
            answer = answer + (width - T)
        row_mask = torch.cat([mask.new_zeros(1, width - n), mask.new_ones(1, n)], 1)  # (1, width)
        row = PromptRow(torch.cat([embeds.new_zeros(1, width - n, embeds.size(-1)), prompt.unsqueeze(0)], 1),
                        torch.cat([mask.new_zeros(1, n), row_mask], 1), self.position_ids(row_mask))
        return Feed(embeds, torch.cat([mask.new_ones(B, n), mask], 1), answer, self.position_ids(mask, n), cache,
                    prepended=width - T - dropped, prompt_row=row)


def fill_slots(embeds: torch.Tensor, slots: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """``embeds`` (B, T, H) with prompt vector ``slots[b, t]`` wherever that is a slot (>= 0).

    Looked up with ``F.embedding``, not ``prompt[slots]``: the backward of advanced indexing sums the
    gradients of repeated indices (every row's slots, and each non-slot position clamped to 0) with
    atomic adds on a multi-threaded CPU, in an order that changes from call to call, so a seeded
    P-tuning run did not repeat itself; the embedding backward sums them in a fixed order."""
    return torch.where((slots >= 0).unsqueeze(-1), F.embedding(slots.clamp(min=0), prompt), embeds)


def shared_lead(batch: dict, limit: int | None = None) -> int:
    """How many leading tokens (and ``{soft}`` slots) every row of a left-padded batch starts with,
    stopping before the earliest answer position (and at ``limit``): on a causal LM those positions
    attend only to each other at the same positions in every row, so their keys/values are the same everywhere."""
    ids, mask, slots, answer = batch["input_ids"], batch["attention_mask"], batch["soft_index"], batch["answer_pos"]
    B, T = ids.shape
    start = T - mask.sum(1)
    most = int((answer - start).min()) if B > 1 else 0
    most = most if limit is None else min(most, limit)
    if most <= 0:
        return 0
    where = start[:, None] + torch.arange(most, device=ids.device)
    lead_ids, lead_slots = ids.gather(1, where), slots.gather(1, where)
    same = ((lead_ids == lead_ids[:1]) & (lead_slots == lead_slots[:1])).all(0)
    return int(same.long().cumprod(0).sum())
