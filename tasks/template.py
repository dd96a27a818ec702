"""The template language.

A template is plain text with placeholders in braces:

* ``{field}``: an input field of the task, e.g. ``{sentence}`` or ``{e1}``;
* ``{mask}``: the answer slot, where the label word (or answer) goes;
* ``{soft}`` / ``{soft:N}``: N learnable token slots (soft prompt vectors, or P-tuning
  pseudo tokens filled by the prompt encoder);
* ``{{`` and ``}}``: literal braces.

Templates are parsed, never evaluated: there is no attribute access, indexing or
format spec. Anything else in braces is an error that names the template.

Example:
    >>> Template.parse("Review: {sentence} Sentiment: {mask}", fields=["sentence"]).pieces
    (Text('Review:'), Field(' ', 'sentence'), Text(' Sentiment:'), Mask(' '))

Whitespace right before a placeholder moves onto the placeholder (``Field.space``),
because BPE tokenizers attach a space to the word after it (" positive").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Union


class TemplateError(ValueError):
    """A template that cannot be parsed or does not fit its task."""


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Field:
    space: str
    name: str


@dataclass(frozen=True)
class Mask:
    space: str


@dataclass(frozen=True)
class Soft:
    count: int


Piece = Union[Text, Field, Mask, Soft]
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True)
class Template:
    """A parsed template: a sequence of text, field, mask and soft pieces."""

    source: str
    pieces: tuple[Piece, ...]
    key: str = "template"

    @classmethod
    def parse(cls, source: str, fields: Iterable[str], key: str = "data.init_args.template") -> "Template":
        """Parse ``source``; ``fields`` are the names it may use, ``key`` names it in errors."""
        fields = list(fields)
        if not isinstance(source, str) or not source.strip():
            raise TemplateError(f"{key}: template is empty")
        pieces: list[Piece] = []
        buf: list[str] = []
        pos = 0

        def flush_text() -> str:
            text = "".join(buf)
            buf.clear()
            stripped = text.rstrip()
            if stripped:
                pieces.append(Text(stripped))
            return text[len(stripped):]

        for match in _PLACEHOLDER.finditer(source):
            buf.append(source[pos:match.start()])
            pos = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                buf.append(token[0])
                continue
            body = match.group(1)
            if body is None:
                raise TemplateError(f"{key}: unbalanced '{token}' at column {match.start()} in {source!r}")
            space = flush_text()
            name, colon, arg = body.strip().partition(":")
            if name == "mask" and not colon:
                pieces.append(Mask(space))
            elif name == "soft":
                if colon and (not arg.isdigit() or int(arg) == 0):
                    raise TemplateError(f"{key}: '{{{body}}}' needs a positive count, e.g. {{soft:10}}, in {source!r}")
                pieces.append(Soft(int(arg) if colon else 1))
            elif name in fields and not colon:
                pieces.append(Field(space, name))
            else:
                known = ", ".join("{" + f + "}" for f in fields)
                raise TemplateError(
                    f"{key}: unknown placeholder '{{{body}}}' in {source!r}; known: {known}, {{mask}}, {{soft:N}}"
                )
        buf.append(source[pos:])
        flush_text()
        return cls(source, tuple(pieces), key)

    @property
    def fields(self) -> list[str]:
        return [p.name for p in self.pieces if isinstance(p, Field)]

    @property
    def num_soft(self) -> int:
        return sum(p.count for p in self.pieces if isinstance(p, Soft))

    @property
    def has_mask(self) -> bool:
        return any(isinstance(p, Mask) for p in self.pieces)

    def require_mask(self) -> "Template":
        masks = sum(isinstance(p, Mask) for p in self.pieces)
        if masks != 1:
            raise TemplateError(f"{self.key}: template needs exactly one {{mask}} answer slot, found {masks} in {self.source!r}")
        return self

    def require_fields(self, required: Iterable[str]) -> "Template":
        missing = [f for f in required if f not in self.fields]
        if missing:
            raise TemplateError(f"{self.key}: template {self.source!r} does not use required field(s) {missing}")
        return self

