"""Generative answers: teacher-forced loss on the gold answer, greedy decoding for predictions.

Works with every method because it starts from the method's :class:`Feed`: soft prompts and
P-tuning vectors are in the prompt embeddings and a prefix is in the cache, so they apply at the
first decoding step; after that the cache grows one token at a time as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutput

from datamodules.encoding import sentinels
from prompt_methods.prompt_cache import output_cache
from prompt_methods.readout import Feed, base_forward


class Generator(nn.Module):
    """Answer generation for causal and seq2seq backbones.

    Args:
        kind: ``causal`` or ``seq2seq``.
        eos_id: token that ends an answer.
        max_new_tokens: the longest answer generated.
        tokenizer: with it, a causal row also stops at a line break that follows some text: an
            answer is the first line of its stripped text (``PromptModule.answer_texts``), so what
            came after was decoded only to be cut off. The answers are the same.
        vocab_size: the ids the LM head scores, when more than the tokenizer's (padded rows).
    """

    def __init__(self, kind: str, eos_id: int, max_new_tokens: int = 24, tokenizer=None, vocab_size: int = 0):
        super().__init__()
        if kind not in ("causal", "seq2seq"):
            raise ValueError(f"generation needs a causal or seq2seq backbone, not {kind}")
        self.kind, self.eos_id, self.max_new_tokens = kind, eos_id, max_new_tokens
        # a T5-style decoder starts its answer with the input's <extra_id_0> and ends it at <extra_id_1>
        # (``encoding.generation_target``), as its pretraining filled masked spans
        self.sentinels = sentinels(tokenizer) if tokenizer is not None and kind == "seq2seq" else None
        self.stops = {eos_id} | ({self.sentinels[1]} if self.sentinels else set())
        self.line_ends = tokenizer is not None and kind == "causal"
        if self.line_ends:
            text, breaks, ends = line_break_tables(tokenizer, vocab_size)
            self.register_buffer("token_has_text", text, persistent=False)
            self.register_buffer("token_breaks", breaks, persistent=False)
            self.register_buffer("token_ends_line", ends, persistent=False)

    @staticmethod
    def _positions_after(feed: Feed, mask: torch.Tensor) -> torch.Tensor | None:
        """(B, n) positions of tokens that follow the feed's (mask (B, n) skips padding)."""
        return None if feed.position_ids is None else feed.position_ids[:, -1:] + mask.long().cumsum(1)

    @classmethod
    def _extend(cls, feed: Feed, embeds: torch.Tensor, mask: torch.Tensor, cache) -> Feed:
        """Feed for tokens that follow the prompt, whose keys/values are in ``cache``: mask and positions continue it."""
        return Feed(embeds, torch.cat([feed.attention_mask, mask], 1), feed.answer_pos, cls._positions_after(feed, mask), cache)

    def loss(self, backbone, feed: Feed, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the gold answer tokens (B, L) given the prompt."""
        if self.kind == "seq2seq":
            enc = base_forward(backbone, feed).last_hidden_state
            labels = targets.masked_fill(target_mask == 0, -100)
            return backbone(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=feed.attention_mask,
                            labels=labels).loss
        embeds = backbone.get_input_embeddings()(targets).to(feed.inputs_embeds.dtype)  # (B, L, H)
        full = feed.appended(embeds, target_mask, self._positions_after(feed, target_mask))
        L = targets.size(1)
        hidden = base_forward(backbone, full, keep=L + 1).last_hidden_state[:, :-1]  # (B, L, H): predicts each target
        logits = backbone.get_output_embeddings()(hidden).float()  # LM head on answer positions only
        return F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(target_mask == 0, -100))

    @torch.no_grad()
    def generate(self, backbone, feed: Feed) -> list[list[int]]:
        """Greedy decoding; token ids of each answer without the end token."""
        B = feed.inputs_embeds.size(0)
        if self.kind == "seq2seq":
            enc = base_forward(backbone, feed).last_hidden_state
            start = [backbone.config.decoder_start_token_id] + ([self.sentinels[0]] if self.sentinels else [])
            lead = torch.tensor([start] * B, device=enc.device)
            # plain greedy decoding: a checkpoint's own generation settings (BART's beams, minimum length,
            # n-gram blocking, forced first token) would fill in whatever generate() is not told, so the
            # model's generation config is swapped for a bare one during the call
            greedy = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                      eos_token_id=sorted(self.stops), pad_token_id=getattr(backbone.config, "pad_token_id", None),
                                      decoder_start_token_id=start[0])
            own, backbone.generation_config = backbone.generation_config, greedy
            try:
                out = backbone.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                                        attention_mask=feed.attention_mask, decoder_input_ids=lead)
            finally:
                backbone.generation_config = own
            tokens = out[:, len(start):]
        else:
            out = base_forward(backbone, feed, use_cache=True, keep=1)
            cache, hidden, steps = output_cache(out), out.last_hidden_state[:, -1], []
            done = torch.zeros(B, dtype=torch.bool, device=hidden.device)
            has_text = torch.zeros_like(done)  # a row has produced more than whitespace
            for _ in range(self.max_new_tokens):
                nxt = backbone.get_output_embeddings()(hidden).argmax(-1)  # (B,)
                nxt = nxt.masked_fill(done, self.eos_id)
                steps.append(nxt)
                done |= nxt == self.eos_id
                if self.line_ends:
                    done |= self.token_ends_line[nxt] | (has_text & self.token_breaks[nxt])
                    has_text |= self.token_has_text[nxt]
                if done.all():
                    break
                embeds = backbone.get_input_embeddings()(nxt[:, None]).to(feed.inputs_embeds.dtype)
                feed = self._extend(feed, embeds, torch.ones_like(nxt[:, None]), cache)
                out = base_forward(backbone, feed, use_cache=True)
                cache, hidden = output_cache(out), out.last_hidden_state[:, -1]
            tokens = torch.stack(steps, 1)
        answers = []
        for row in tokens.tolist():
            end = next((i for i, t in enumerate(row) if t in self.stops), len(row))
            answers.append(row[:end])
        return answers


def line_break_tables(tokenizer, size: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token id (V,): its text holds more than whitespace; it holds a line break; it holds text
    and then a line break. A token that decodes to part of a character (U+FFFD) counts as neither
    text nor text-then-break, so a row never stops earlier than the decoded answer would end. Ids
    past the tokenizer's, up to ``size`` (an LM head's padded rows), count as none of them."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    texts += [""] * (size - len(texts))
    clean = [t.replace("\ufffd", " ") for t in texts]
    has_text = torch.tensor([bool(t.strip()) for t in clean])
    breaks = torch.tensor(["\n" in t for t in texts])
    ends = torch.tensor(["\n" in t.lstrip() for t in clean])
    return has_text, breaks, ends
