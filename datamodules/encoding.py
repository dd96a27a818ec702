"""Template + tokenizer -> token ids, with the answer slot, learnable slots and truncation.

The answer slot is rendered by backbone kind:

* ``causal``: the prompt ends right before the slot; the answer is read at the last position and
  everything after ``{mask}`` is dropped (a causal model cannot see it anyway).
* ``mlm`` / ``encoder``: the tokenizer's mask token, repeated once per token of the longest label
  word for ``mlm``.
* ``seq2seq``: the first sentinel (``<extra_id_0>``) or the mask token; the decoder scores the answer.

Learnable slots get the pad id as a placeholder and their slot number in ``soft_index``
(-1 elsewhere). Only input fields are truncated, longest first; template text, slots and special
tokens are never cut.

Pieces are tokenized one by one, each as it reads inside the prompt (:class:`PieceTokenizer`):
a SentencePiece-style tokenizer marks the start of every text it is given as a word start, so
``"? Answer:"`` alone gets a stray ``▁`` that the whole prompt would not have.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tasks.template import Field, Mask, Soft, Template, TemplateError, Text


@dataclass
class Encoded:
    input_ids: list[int]
    soft_index: list[int]
    answer_pos: int
    #: for ``offsets_field``: sequence position -> (char start, char end) in that field's original text
    offsets: dict[int, tuple[int, int]] | None = None


#: texts put before a piece to tokenize it as it reads after other text (then their tokens are
#: dropped), tried in turn: a letter, then a line break (a byte token that merges with nothing
#: on SentencePiece vocabularies), for a piece whose first letters would merge into the letter
ANCHORS = ("a", "\n")
#: pieces whose tokens differ alone and after text when a tokenizer marks word starts (``▁?`` vs ``?``)
PROBES = ("?", " a", ".")


class PieceTokenizer:
    """Token ids of a piece of a prompt, as the piece reads after other text.

    Byte-level BPE and WordPiece tokenize a piece alone as they do inside a longer text. A tokenizer
    that prepends a word-start mark to each text it is given (SentencePiece's dummy prefix: Llama-2,
    Mistral, T5 with transformers' Metaspace pre-tokenizer) gives a piece that follows text without a
    space (``"{question}? Answer:"``) a stray ``▁`` token. For such a tokenizer (found by
    :data:`PROBES`), a piece that does not start the prompt is tokenized after one of
    :data:`ANCHORS`, whose tokens are then dropped; where the piece merges into every anchor's
    tokens, alone. Holds the tokenizer weakly (one is kept per tokenizer: :func:`piece_tokenizer`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = weakref.ref(tokenizer)
        self.anchors = [(text, ids) for text in ANCHORS if (ids := self.plain(text))]
        self.anchored = any(self._after(p) not in (None, self.plain(p)) for p in PROBES)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer()

    def plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _after(self, text: str, offsets: bool = False):
        """The ids of ``text`` after the first anchor that keeps its own tokens (with char spans in
        ``text`` when ``offsets``), or None."""
        for anchor, anchor_ids in self.anchors:
            enc = self.tokenizer(anchor + text, add_special_tokens=False, return_offsets_mapping=offsets)
            n = len(anchor_ids)
            if enc["input_ids"][:n] != anchor_ids:
                continue
            if not offsets:
                return enc["input_ids"][n:]
            shift = len(anchor)
            return enc["input_ids"][n:], [(max(0, a - shift), max(0, b - shift)) for a, b in enc["offset_mapping"][n:]]
        return None

    def __call__(self, text: str, first: bool = False) -> list[int]:
        """The ids of ``text``; ``first``: no text comes before it (it starts the prompt, or a
        seq2seq decoder's answer), so it is tokenized alone."""
        if first or not self.anchored or not text:
            return self.plain(text)
        ids = self._after(text)
        return self.plain(text) if ids is None else ids

    def with_offsets(self, text: str, first: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of ``text`` and each token's character span in it."""
        got = None if first or not self.anchored else self._after(text, offsets=True)
        if got is None:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            got = enc["input_ids"], list(enc["offset_mapping"])
        return got


_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def piece_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PieceTokenizer:
    """The tokenizer's :class:`PieceTokenizer`, probed once per tokenizer."""
    if tokenizer not in _PIECES:
        _PIECES[tokenizer] = PieceTokenizer(tokenizer)
    return _PIECES[tokenizer]


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer puts before and after a sequence (e.g. [CLS] / [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
    return full[:start], full[start + len(plain):]


class TemplateTokenizer:
    """Tokenizes examples through a template for one backbone kind.

    Args:
        tokenizer: the backbone's tokenizer.
        template: the parsed template.
        kind: backbone kind (causal, mlm, seq2seq, encoder).
        max_length: the most tokens a prompt may have (``data.init_args.max_length``).
        mask_tokens: how many mask tokens the slot takes for ``mlm`` backbones.
    """

    def __init__(self, tokenizer, template: Template, kind: str, max_length: int, mask_tokens: int = 1):
        self.tokenizer = tokenizer
        self.template = template
        self.kind = kind
        self.max_length = max_length
        self.prefix, self.suffix = special_affixes(tokenizer)
        if kind == "causal":
            self.suffix = []  # nothing may follow the answer position
            self._refuse_input_after_mask()
        self.mask_ids = self._mask_ids(mask_tokens)
        self.pieces = piece_tokenizer(tokenizer)
        # a piece with no template text or field before it starts the text (leading {soft} slots are not text)
        seen, self._starts = False, {}
        for p in template.pieces:
            self._starts[id(p)] = not seen
            seen = seen or isinstance(p, (Text, Field))
        self._text_ids = {id(p): self.pieces(p.text, first=self._starts[id(p)]) for p in template.pieces if isinstance(p, Text)}
        fixed = len(self.prefix) + len(self.suffix) + sum(self._fixed_len(p) for p in self._pieces())
        if fixed >= max_length:
            raise TemplateError(
                f"data.init_args.max_length={max_length} is shorter than the template itself "
                f"({fixed} tokens without any input) for {template.source!r}"
            )
        self.budget = max_length - fixed

    def _refuse_input_after_mask(self) -> None:
        """A causal LM reads the answer where ``{mask}`` starts and never sees what follows it: template
        text there may go, but a field or ``{soft}`` slot there would be dropped without a word."""
        pieces = self.template.pieces
        cut = next((i for i, p in enumerate(pieces) if isinstance(p, Mask)), len(pieces))
        lost = [f"{{{p.name}}}" if isinstance(p, Field) else f"{{soft:{p.count}}}"
                for p in pieces[cut + 1:] if isinstance(p, (Field, Soft))]
        if lost:
            raise TemplateError(
                f"{self.template.key}: {', '.join(lost)} after {{mask}} in {self.template.source!r}: a causal LM reads the "
                f"answer at {{mask}} and never sees what follows it; move {'them' if len(lost) > 1 else 'it'} before {{mask}}"
            )

    def _mask_ids(self, count: int) -> list[int]:
        if self.kind == "causal":
            return []
        if self.kind == "seq2seq" and "<extra_id_0>" in self.tokenizer.get_vocab():
            return [self.tokenizer.convert_tokens_to_ids("<extra_id_0>")]
        if self.tokenizer.mask_token_id is None:
            raise TemplateError(f"{self.template.key}: the tokenizer has no mask token for the {{mask}} slot")
        return [self.tokenizer.mask_token_id] * (count if self.kind == "mlm" else 1)

    def _pieces(self):
        """Pieces that produce tokens; for causal backbones, everything up to the answer slot."""
        pieces = self.template.pieces
        if self.kind == "causal":
            cut = next((i for i, p in enumerate(pieces) if isinstance(p, Mask)), len(pieces))
            pieces = pieces[: cut + 1]
        return pieces

    def _fixed_len(self, piece) -> int:
        if isinstance(piece, Text):
            return len(self._text_ids[id(piece)])
        if isinstance(piece, Soft):
            return piece.count
        if isinstance(piece, Mask):
            return len(self.mask_ids)
        return 0

    @staticmethod
    def mask_space(template: Template) -> str:
        """Whitespace the template puts before ``{mask}``; label words are tokenized with it."""
        mask = next((p for p in template.pieces if isinstance(p, Mask)), None)
        return mask.space if mask else ""

    def encode_fields(self, example: dict, offsets_field: str | None = None) -> tuple[dict[int, list[int]], dict]:
        """Tokenize every field occurrence (keyed by piece index), truncated to the budget, longest first.
        Also returns char offsets (into the original value) of ``offsets_field``'s tokens, keyed by piece index."""
        ids, offsets = {}, {}
        for index, piece in enumerate(self._pieces()):
            if isinstance(piece, Field):
                raw = "" if example.get(piece.name) is None else str(example[piece.name])
                value = raw.strip()
                if piece.name == offsets_field and value:
                    ids[index], spans = self.pieces.with_offsets(piece.space + value, first=self._starts[id(piece)])
                    shift = len(raw) - len(raw.lstrip()) - len(piece.space)  # spans into piece.space + value
                    # (a word-start token's span may cover the space before the value: from 0 then)
                    offsets[index] = [(max(0, a + shift), max(0, b + shift)) for a, b in spans]
                    continue
                ids[index] = self.pieces(piece.space + value, first=self._starts[id(piece)]) if value else []
        total = sum(len(v) for v in ids.values())
        while total > self.budget:
            longest = max(ids, key=lambda k: len(ids[k]))
            runner_up = max((len(v) for k, v in ids.items() if k != longest), default=0)
            cut = min(total - self.budget, max(1, len(ids[longest]) - runner_up))
            ids[longest] = ids[longest][: len(ids[longest]) - cut]
            total -= cut
        return ids, offsets

    def encode(self, example: dict, offsets_field: str | None = None) -> Encoded:
        fields, field_offsets = self.encode_fields(example, offsets_field)
        offsets = {} if offsets_field else None
        input_ids = list(self.prefix)
        soft_index = [-1] * len(input_ids)
        answer_pos, slot = None, 0
        pad = self.tokenizer.pad_token_id
        for index, piece in enumerate(self._pieces()):
            if isinstance(piece, Text):
                chunk, soft = self._text_ids[id(piece)], None
            elif isinstance(piece, Field):
                chunk, soft = fields[index], None
                for k, span in enumerate(field_offsets.get(index, [])[: len(chunk)]):
                    offsets[len(input_ids) + k] = span
            elif isinstance(piece, Soft):
                chunk, soft = [pad] * piece.count, list(range(slot, slot + piece.count))
                slot += piece.count
            else:  # Mask
                answer_pos = len(input_ids) if self.mask_ids else None
                chunk, soft = self.mask_ids, None
            input_ids += chunk
            soft_index += soft if soft is not None else [-1] * len(chunk)
        input_ids += self.suffix
        soft_index += [-1] * len(self.suffix)
        if answer_pos is None:
            answer_pos = len(input_ids) - 1 if self.kind == "causal" else 0
        return Encoded(input_ids, soft_index, answer_pos, offsets)


def answer_start(row: dict, field: str) -> int:
    """Where the first gold answer starts in ``field``, in characters: ``answer_starts[0]``, else (a
    user's file without starts) its first occurrence there; -1 where there is none."""
    answers = row.get("answers") or []
    starts = row.get("answer_starts") or [None]
    if starts[0] is not None and starts[0] >= 0:
        return starts[0]
    return str(row.get(field, "")).find(str(answers[0])) if answers and str(answers[0]) else -1


def answer_span(enc: Encoded, row: dict, field: str) -> dict:
    """An extractive answer's item fields: the token span (start, end) of the first gold answer
    inside ``field`` (at ``answer_starts[0]``, else its first occurrence there; position 0 when
    truncation cut it away or it is not there), plus the offsets, the field's text
    and all gold answers. ``enc`` must come from ``encode(row, offsets_field=field)``."""
    answers = [str(a) for a in row.get("answers") or []]
    start = end = 0
    first = answer_start(row, field)
    if answers and first >= 0:
        a, b = first, first + len(answers[0])
        inside = [p for p, (x, y) in enc.offsets.items() if x < b and y > a]
        if inside:
            start, end = min(inside), max(inside)
    return {"offsets": enc.offsets, "context": str(row[field]), "answers": answers, "span": (start, end)}


def sentinels(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int] | None:
    """The ids of ``<extra_id_0>`` and ``<extra_id_1>`` where the tokenizer has them (T5's span sentinels)."""
    vocab = tokenizer.get_vocab()
    first, second = vocab.get("<extra_id_0>"), vocab.get("<extra_id_1>")
    return None if first is None or second is None else (first, second)


def generation_target(tokenizer: PreTrainedTokenizerBase, answer: str, space: str, max_tokens: int,
                      kind: str = "causal") -> list[int]:
    """Token ids a generated answer is trained on: the answer (after ``space``, as it follows the
    prompt), cut to ``max_tokens - 1`` tokens, then the end token. A T5-style seq2seq decoder fills
    the input's ``<extra_id_0>`` as in pretraining: ``<extra_id_0> answer <extra_id_1>``, then the end."""
    ids = piece_tokenizer(tokenizer)(space + answer.strip(), first=kind == "seq2seq")  # a causal answer follows the prompt
    marks = sentinels(tokenizer) if kind == "seq2seq" else None
    if marks:
        return [marks[0]] + ids[: max(1, max_tokens - 3)] + [marks[1], tokenizer.eos_token_id]
    return ids[: max_tokens - 1] + [tokenizer.eos_token_id]


def tokenize_label_words(tokenizer: PreTrainedTokenizerBase, template: Template, labels: list[str],
                         label_words: dict[str, list[str]], kind: str = "causal") -> list[list[list[int]]]:
    """Token ids of every word of every label (in ``labels`` order), tokenized as they follow the
    template's ``{mask}`` (with its leading space, if any): after the prompt, or at the start of a
    seq2seq decoder's answer."""
    space = TemplateTokenizer.mask_space(template)
    pieces = piece_tokenizer(tokenizer)
    out = []
    for label in labels:
        words = []
        for word in label_words[label]:
            ids = pieces(space + word.strip(), first=kind == "seq2seq")
            if not ids:
                raise TemplateError(f"data.init_args.label_words: word {word!r} of label {label!r} tokenizes to nothing")
            words.append(ids)
        out.append(words)
    return out
