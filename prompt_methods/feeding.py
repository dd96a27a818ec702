"""How a batch becomes the backbone's inputs (a :class:`~prompt_methods.readout.Feed`).

:class:`Feeding` is the part of :class:`~prompt_methods.base.PromptModule` that embeds the tokens,
numbers the positions around left padding and puts prompt vectors in place: at the template's
``{soft}`` slots, before the input, or (on a frozen causal backbone) once per batch, in a shared
row whose keys/values every row attends to (:mod:`prompt_methods.prompt_cache`). Methods override ``feed``.
"""

from __future__ import annotations

import torch

from prompt_methods.prompt_cache import PromptRow, prompt_row_cache, prompt_row_pays
from prompt_methods.readout import Feed


class Feeding:
    """Mixed into :class:`~prompt_methods.base.PromptModule`; uses its ``backbone``, ``kind``,
    ``tune_backbone``, ``compile_layers`` and ``share_prompt``."""

    def embed(self, batch: dict) -> torch.Tensor:
        """(B, T, H) token embeddings; a batch may carry ``inputs_embeds`` instead of ids."""
        if "inputs_embeds" in batch:
            return batch["inputs_embeds"]
        return self.backbone.get_input_embeddings()(batch["input_ids"])

    def position_ids(self, attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor | None:
        """(B, T) positions that skip left padding; None where the backbone has no absolute positions."""
        if self.kind == "seq2seq":
            return None
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset

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
        compiled (the cache would make every layer compile anew)."""
        return self.share_prompt and self.kind == "causal" and not self.tune_backbone and not self.compile_layers

    def feed_with_prompt(self, batch: dict, prompt: torch.Tensor, key: str) -> Feed:
        """Put N prompt vectors (N, H) into the batch: at the template's ``{soft}`` slots if it has
        any, else before the input (Lester et al.): in every row, or once as a shared row where
        that is allowed (:meth:`shares_prompt`) and fewer positions. ``key`` names the count in errors."""
        embeds = self.embed(batch)  # (B, T, H)
        prompt = prompt.to(embeds.dtype)
        mask, answer, slots = batch["attention_mask"], batch["answer_pos"], batch["soft_index"]
        n_slots = int(slots.max()) + 1
        if n_slots <= 0 and self.shares_prompt() and prompt_row_pays(*mask.shape, prompt.size(0)):
            feed = self._feed_with_prompt_row(embeds, mask, answer, prompt)
            if feed is not None:
                return feed
        if n_slots > 0:
            if n_slots != prompt.size(0):
                raise ValueError(
                    f"data.init_args.template has {n_slots} {{soft}} slots but {key} is {prompt.size(0)}; make them equal"
                )
            filled = prompt[slots.clamp(min=0)]  # (B, T, H)
            embeds = torch.where((slots >= 0).unsqueeze(-1), filled, embeds)
        else:
            B = embeds.size(0)
            embeds = torch.cat([prompt.unsqueeze(0).expand(B, -1, -1), embeds], 1)  # (B, N + T, H)
            mask = torch.cat([mask.new_ones(B, prompt.size(0)), mask], 1)
            answer = answer + prompt.size(0)
        return Feed(embeds, mask, answer, self.position_ids(mask), prepended=int(embeds.size(1) - slots.size(1)))

    def _feed_with_prompt_row(self, embeds: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor,
                              prompt: torch.Tensor) -> Feed | None:
        """The batch's rows (left-padded to at least N places) with the prompt as a shared first row."""
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
                    prepended=width - T, prompt_row=row)
