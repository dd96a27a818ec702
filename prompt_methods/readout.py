"""How the answer is read: label-word scores from an LM head, or a classification head.

Each readout maps a :class:`Feed` (what a method made of the batch) to label scores of shape
(B, C). They know the backbone kind, never the method.

* :class:`CausalLabelWords`: log p(word | prompt) at the last position; the LM head runs only
  there. Multi-token words are scored as sequences: the prompt is encoded once and every label
  continuation is scored against its cache, in one batched pass.
* :class:`MaskedLabelWords`: log p at the mask slot(s) of a masked LM (one mask token per word token).
* :class:`Seq2SeqLabelWords`: the decoder scores ``<extra_id_0> word`` against one encoder pass.
* :class:`ClassificationHead`: a new linear layer on the hidden state at the answer position,
  for encoders without an LM head and for the fine-tuning baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prompt_methods import runtime
from prompt_methods.prompt_cache import cache_keyword, output_cache


@dataclass
class Feed:
    """What a method hands the backbone.

    Attributes:
        inputs_embeds: (B, T, H) input embeddings, prompt vectors already in place.
        attention_mask: (B, P + T) with P prefix positions held in ``past_key_values``.
        answer_pos: (B,) index in T where the answer is read.
        position_ids: (B, T) or None for the backbone's default.
        past_key_values: a transformers Cache holding a prefix, or None.
        prepended: positions put before the batch's tokens (prompt vectors), so T' = prepended + T;
            negative where leading tokens moved into a shared prompt row (causal LMs only, whose
            readouts do not use it; the span head of encoders does).
        prompt_row: a shared prompt run as an extra first row (:class:`~prompt_methods.prompt_cache.PromptRow`)
            whose keys/values the cache puts before every row's; :func:`base_forward` adds it and
            drops it again, so readouts see the B rows only.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    answer_pos: torch.Tensor
    position_ids: torch.Tensor | None = None
    past_key_values: object | None = None
    prepended: int = 0
    prompt_row: object | None = None

    def appended(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None) -> Feed:
        """This feed with tokens (B, n, H) after each row's last one (mask (B, n), positions (B, n)),
        for a first pass over prompt and continuation together."""
        return Feed(torch.cat([self.inputs_embeds, embeds], 1), torch.cat([self.attention_mask, mask], 1), self.answer_pos,
                    None if self.position_ids is None else torch.cat([self.position_ids, positions], 1),
                    self.past_key_values, self.prepended,
                    None if self.prompt_row is None else self.prompt_row.extended(embeds.size(1)))


#: names of learned absolute position tables (BERT/RoBERTa, GPT-2, BART/OPT); rotary and relative
#: position schemes have no table and no hard limit
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(backbone) -> int | None:
    """How many positions ``backbone``'s learned position table numbers, or None where it has none."""
    if not hasattr(backbone, "_promptlit_position_limit"):
        cfg = backbone.config.get_text_config()
        table = any(isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES
                    for name, m in backbone.named_modules())
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        backbone._promptlit_position_limit = limit if table else None
    return backbone._promptlit_position_limit


def position_base(backbone) -> int:
    """The first position id of a sequence: ``padding_idx + 1`` for RoBERTa-style embeddings (RoBERTa,
    XLM-R, CamemBERT number positions after the padding row, as they do themselves when given no
    ``position_ids``), else 0."""
    if not hasattr(backbone, "_promptlit_position_base"):
        emb = getattr(backbone.base_model, "embeddings", None)
        pad = getattr(emb, "padding_idx", None)
        backbone._promptlit_position_base = pad + 1 if pad is not None and hasattr(emb, "position_embeddings") else 0
    return backbone._promptlit_position_base


def base_forward(backbone, feed: Feed, use_cache: bool = False, keep: int | None = None):
    """The backbone's pass over a feed (its encoder for an encoder-decoder). ``keep``: the caller reads
    only each row's last ``keep`` hidden states, which is all the output then holds; the last layer
    computes no more than those (:func:`~prompt_methods.runtime.last_layer_reads`)."""
    limit, length = position_limit(backbone), feed.attention_mask.size(-1)
    if limit is not None and length + position_base(backbone) > limit:  # else an index error inside the embedding lookup
        raise ValueError(
            f"data.init_args.max_length: a batch needs {length} positions (its tokens plus the prompt's), more than "
            f"the {limit - position_base(backbone)} this backbone has position embeddings for; lower "
            "data.init_args.max_length (or the prompt length)"
        )
    if (feed.past_key_values is not None or use_cache) and runtime.checkpointed_pass(backbone):
        raise ValueError(
            "gradient checkpointing is on in the backbone, and transformers drops the key/value cache a checkpointed "
            "layer is handed while training; "
            + ("this method hands its prompt to the layers as one (prefix tuning's keys/values)" if feed.past_key_values
               is not None else "label words of several tokens are scored as continuations of the prompt's cache")
            + ": turn gradient checkpointing off (backbone.gradient_checkpointing_disable())"
            + ("" if feed.past_key_values is not None else ", or give every label one token (data.init_args.label_words)")
        )
    kwargs = dict(inputs_embeds=feed.inputs_embeds, attention_mask=feed.attention_mask, use_cache=use_cache)
    if feed.position_ids is not None:
        kwargs["position_ids"] = feed.position_ids
    if feed.past_key_values is not None:
        kwargs[cache_keyword(backbone.base_model) or "past_key_values"] = feed.past_key_values
    if backbone.config.is_encoder_decoder:
        out = backbone.get_encoder()(**{k: v for k, v in kwargs.items() if k != "use_cache"})
        if keep:
            out.last_hidden_state = out.last_hidden_state[:, -keep:]
        return out
    row = feed.prompt_row
    if row is not None:
        kwargs.update(inputs_embeds=torch.cat([row.inputs_embeds, feed.inputs_embeds]),
                      attention_mask=torch.cat([row.attention_mask, feed.attention_mask]),
                      position_ids=torch.cat([row.position_ids, feed.position_ids]))
    with runtime.last_layer_reads(backbone, keep):
        out = backbone.base_model(**kwargs)
    if keep:
        out.last_hidden_state = out.last_hidden_state[:, -keep:]
    if row is None:
        return out
    out.last_hidden_state = out.last_hidden_state[1:]  # the batch's rows
    rows = torch.arange(1, feed.inputs_embeds.size(0) + 1, device=feed.inputs_embeds.device)
    feed.past_key_values.batch_select_indices(rows)  # now a prefix cache of the batch's rows
    return out


def gather_positions(hidden: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), pos (B, K) -> (B, K, H)."""
    return hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))


class _LabelWords(nn.Module):
    """Holds the verbalizer as padded tensors: ``words`` (W, L) token ids, ``word_label`` (W,)."""

    def __init__(self, verbalizer: list[list[list[int]]], length_norm: bool = False):
        super().__init__()
        flat = [(label, ids) for label, words in enumerate(verbalizer) for ids in words]
        longest = max(len(ids) for _, ids in flat)
        words = torch.zeros(len(flat), longest, dtype=torch.long)
        lengths = torch.tensor([len(ids) for _, ids in flat])
        for i, (_, ids) in enumerate(flat):
            words[i, : len(ids)] = torch.tensor(ids)
        self.register_buffer("words", words, persistent=False)  # (W, L)
        self.register_buffer("lengths", lengths, persistent=False)  # (W,)
        self.register_buffer("word_label", torch.tensor([lab for lab, _ in flat]), persistent=False)
        self.num_labels = len(verbalizer)
        self.length_norm = length_norm

    @property
    def multi_token(self) -> bool:
        return int(self.lengths.max()) > 1

    def token_mask(self) -> torch.Tensor:
        return torch.arange(self.words.size(1), device=self.words.device) < self.lengths[:, None]  # (W, L)

    def aggregate(self, word_scores: torch.Tensor) -> torch.Tensor:
        """(B, W) per-word sequence log-probs -> (B, C) label scores: log of the mean word probability."""
        if self.length_norm:
            word_scores = word_scores / self.lengths
        out = word_scores.new_full((word_scores.size(0), self.num_labels), -math.inf)
        index = self.word_label.expand_as(word_scores)
        out = out.scatter_reduce(1, index, word_scores, reduce="amax", include_self=True)
        # log-mean-exp per label, stable around the per-label max
        summed = torch.zeros_like(out).scatter_add(1, index, (word_scores - out.gather(1, index)).exp())
        counts = torch.bincount(self.word_label, minlength=self.num_labels).to(out)
        return out + summed.log() - counts.log()


class CausalLabelWords(_LabelWords):
    def forward(self, backbone, feed: Feed) -> torch.Tensor:
        out = base_forward(backbone, feed, use_cache=self.multi_token, keep=1)
        last = out.last_hidden_state[:, -1]  # (B, H): left padding puts the answer position last
        logp = F.log_softmax(backbone.get_output_embeddings()(last).float(), dim=-1)  # (B, V)
        scores = logp[:, self.words[:, 0]]  # (B, W)
        if self.multi_token:
            scores = scores + self._continuations(backbone, feed, output_cache(out))
        return self.aggregate(scores)

    def _continuations(self, backbone, feed: Feed, cache) -> torch.Tensor:
        """Sum of log p(w_i | prompt, w_<i) for i >= 1, for every word, one pass over a shared cache."""
        B, W = feed.inputs_embeds.size(0), self.words.size(0)
        steps = self.words[:, :-1]  # (W, L-1) inputs; targets are words[:, 1:]
        mask = self.token_mask()[:, 1:]  # (W, L-1) which targets exist
        cache.batch_repeat_interleave(W)
        embeds = backbone.get_input_embeddings()(steps).to(feed.inputs_embeds.dtype)  # (W, L-1, H)
        embeds = embeds.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * W, steps.size(1), -1)  # (B*W, L-1, H)
        prompt_mask = feed.attention_mask.repeat_interleave(W, dim=0)  # (B*W, P+T)
        cont_mask = torch.ones(B * W, steps.size(1), dtype=prompt_mask.dtype, device=prompt_mask.device)
        start = (feed.position_ids[:, -1:] + 1) if feed.position_ids is not None else None
        positions = None if start is None else (start.repeat_interleave(W, 0) + torch.arange(steps.size(1), device=start.device))
        cont = Feed(embeds, torch.cat([prompt_mask, cont_mask], 1), feed.answer_pos, positions, cache)
        hidden = base_forward(backbone, cont).last_hidden_state  # (B*W, L-1, H)
        logp = F.log_softmax(backbone.get_output_embeddings()(hidden).float(), dim=-1)
        targets = self.words[:, 1:].repeat(B, 1)  # (B*W, L-1)
        token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask.repeat(B, 1)
        return token_lp.sum(-1).view(B, W)


    @torch.no_grad()
    def naive(self, backbone, feed_fn) -> torch.Tensor:
        """Reference scoring: the whole prompt is run again for every word, word tokens appended.
        ``feed_fn()`` must return a fresh :class:`Feed` (a prefix cache is consumed by each run).
        Used by tests and the scoring benchmark; the same scores as :meth:`forward`, W times the cost."""
        columns = []
        for w in range(self.words.size(0)):
            feed = feed_fn()
            ids = self.words[w, : int(self.lengths[w])]  # (L_w,)
            B, n = feed.inputs_embeds.size(0), ids.numel()
            embeds = backbone.get_input_embeddings()(ids).to(feed.inputs_embeds.dtype).expand(B, -1, -1)
            pos = None if feed.position_ids is None else feed.position_ids[:, -1:] + 1 + torch.arange(n)
            full = feed.appended(embeds, feed.attention_mask.new_ones(B, n), pos)
            hidden = base_forward(backbone, full).last_hidden_state[:, -n - 1:-1]  # (B, n, H): predicts each word token
            logp = F.log_softmax(backbone.get_output_embeddings()(hidden).float(), dim=-1)
            columns.append(logp.gather(-1, ids.expand(B, -1).unsqueeze(-1)).squeeze(-1).sum(-1))
        return self.aggregate(torch.stack(columns, 1))


class _Chain(nn.Module):
    """An MLM head spread over several top-level children of its model, applied in order."""

    def __init__(self, *steps):
        super().__init__()
        self.steps = steps  # a plain tuple: the modules stay registered with the backbone only

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            hidden = step(hidden)
        return hidden


#: MLM heads that are several top-level children of their model, in the order its forward applies
#: them (DistilBERT; ELECTRA's generator)
SPLIT_HEADS = (("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
               ("generator_predictions", "generator_lm_head"))


def mlm_head(backbone) -> nn.Module:
    """The masked-LM head, hidden states to vocabulary logits: the one top-level child that is not
    the base model (BERT's ``cls``, RoBERTa's ``lm_head``, ...), or a known head split over several."""
    heads = [m for name, m in backbone.named_children()
             if name != backbone.base_model_prefix and not isinstance(m, nn.modules.loss._Loss)]
    if len(heads) == 1:
        return heads[0]
    for names in SPLIT_HEADS:
        if all(callable(getattr(backbone, n, None)) for n in names):
            return _Chain(*(getattr(backbone, n) for n in names))
    raise ValueError(
        f"model.init_args.readout: label_words needs the masked-LM head of {type(backbone).__name__}, which promptlit "
        f"cannot find among its modules ({', '.join(n for n, _ in backbone.named_children())}); use readout: head, or "
        "a causal or seq2seq LM"
    )


class MaskedLabelWords(_LabelWords):
    def forward(self, backbone, feed: Feed) -> torch.Tensor:
        hidden = base_forward(backbone, feed).last_hidden_state
        L = self.words.size(1)
        pos = feed.answer_pos[:, None] + torch.arange(L, device=hidden.device)  # (B, L) mask slots
        logits = mlm_head(backbone)(gather_positions(hidden, pos)).float()  # (B, L, V)
        logp = F.log_softmax(logits, dim=-1)
        index = self.words.t().unsqueeze(0).expand(logp.size(0), -1, -1)  # (B, L, W)
        token_lp = logp.gather(-1, index) * self.token_mask().t()  # (B, L, W)
        return self.aggregate(token_lp.sum(1))


class Seq2SeqLabelWords(_LabelWords):
    def __init__(self, verbalizer, length_norm: bool = False, sentinel_id: int | None = None, start_id: int = 0):
        super().__init__(verbalizer, length_norm)
        lead = [] if sentinel_id is None else [sentinel_id]
        W, L = self.words.shape
        dec = torch.full((W, 1 + len(lead) + L), 0, dtype=torch.long)
        dec[:, 0] = start_id
        if lead:
            dec[:, 1] = sentinel_id
        dec[:, 1 + len(lead):] = self.words
        self.register_buffer("decoder_ids", dec, persistent=False)  # (W, 1 + S + L)
        self.offset = len(lead)

    def forward(self, backbone, feed: Feed) -> torch.Tensor:
        enc = base_forward(backbone, feed).last_hidden_state  # (B, T, H)
        B, W = enc.size(0), self.words.size(0)
        enc = enc.repeat_interleave(W, 0)
        mask = feed.attention_mask.repeat_interleave(W, 0)
        dec_in = self.decoder_ids[:, :-1].repeat(B, 1)  # (B*W, S + L)
        out = backbone(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec_in)
        logp = F.log_softmax(out.logits.float(), dim=-1)[:, self.offset:]  # (B*W, L, V) word positions
        token_lp = logp.gather(-1, self.words.repeat(B, 1).unsqueeze(-1)).squeeze(-1)
        return self.aggregate((token_lp * self.token_mask().repeat(B, 1)).sum(-1).view(B, W))


class ClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels)

    def forward(self, backbone, feed: Feed) -> torch.Tensor:
        width = feed.inputs_embeds.size(1)
        keep = width - int(feed.answer_pos.min())  # the positions from the earliest answer on (a causal LM's: the last)
        hidden = base_forward(backbone, feed, keep=keep).last_hidden_state
        h = gather_positions(hidden, feed.answer_pos[:, None] - (width - keep))[:, 0]  # (B, H)
        return self.linear(self.dropout(h).to(self.linear.weight.dtype))


def build_readout(name: str, kind: str, backbone, verbalizer, length_norm: bool, tokenizer_info: dict) -> nn.Module:
    """Pick a readout. ``auto``: label words when the backbone has an LM head, else a classification head."""
    if name == "auto":
        name = "head" if kind == "encoder" else "label_words"
    if name == "head":
        return ClassificationHead(backbone.config.get_text_config().hidden_size, len(verbalizer))
    if name != "label_words":
        raise ValueError(f"model.init_args.readout: '{name}' is not one of auto, label_words, head")
    if kind == "encoder":
        raise ValueError(
            "model.init_args.readout: label_words needs a backbone with an LM head, but this backbone is a plain "
            "encoder; use readout: head, or a causal/masked/seq2seq LM"
        )
    if kind == "causal":
        return CausalLabelWords(verbalizer, length_norm)
    if kind == "mlm":
        mlm_head(backbone)  # a head it cannot find is an error now, not at the first batch
        return MaskedLabelWords(verbalizer, length_norm)
    return Seq2SeqLabelWords(verbalizer, length_norm, tokenizer_info.get("sentinel_id"),
                             backbone.config.decoder_start_token_id or 0)
