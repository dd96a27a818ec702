"""Relation extraction as classification over a sentence with two marked entities."""

from __future__ import annotations

import re

from datamodules.base import PromptDataModule
from datamodules.readers import DataError

#: entity marker styles: (e1 open, e1 close, e2 open, e2 close)
MARKERS = {
    "xml": ("<e1>", "</e1>", "<e2>", "</e2>"),
    "brackets": ("[E1] ", " [/E1]", "[E2] ", " [/E2]"),
    "punct": ("@ ", " @", "# ", " #"),
    "none": ("", "", "", ""),
}
_TAGGED = re.compile(r"<e1>(.*?)</e1>|<e2>(.*?)</e2>")


def mark_entities(sentence: str, style: str) -> tuple[str, str, str]:
    """``<e1>``/``<e2>``-tagged sentence -> (text in the marker style, e1 mention, e2 mention)."""
    text, e1, e2, _ = marked_spans(sentence, style)
    return text, e1, e2


def marked_spans(sentence: str, style: str) -> tuple[str, str, str, tuple[int, int]]:
    """:func:`mark_entities`, plus the character span in the text from the first entity's opening
    marker to the second's closing one (where the entities are, whatever else the text holds)."""
    o1, c1, o2, c2 = MARKERS[style]
    found, parts, spans, pos = {}, [], [], 0
    for m in _TAGGED.finditer(sentence):
        parts.append(sentence[pos:m.start()])
        first = m.group(1) is not None
        mention = m.group(1) if first else m.group(2)
        found["e1" if first else "e2"] = mention.strip()
        start = sum(len(p) for p in parts)
        parts.append((o1 + mention + c1) if first else (o2 + mention + c2))
        spans.append((start, start + len(parts[-1])))
        pos = m.end()
    parts.append(sentence[pos:])
    if len(found) != 2:
        raise DataError(f"sentence lacks an <e1> or <e2> mention: {sentence!r}")
    return "".join(parts), found["e1"], found["e2"], (min(a for a, _ in spans), max(b for _, b in spans))


class RelationExtractionDataModule(PromptDataModule):
    """Relation classification (SemEval-2010 Task 8, FewRel, or a file of the same shape).

    Rows carry a ``sentence`` with ``<e1>…</e1>`` and ``<e2>…</e2>`` tags and a ``label``; templates
    use ``{text}`` (the sentence in the chosen marker style), ``{e1}`` and ``{e2}``.

    Args:
        entity_markers: how entities are marked in ``{text}``: ``xml`` (``<e1>x</e1>``), ``brackets``
            (``[E1] x [/E1]``), ``punct`` (``@ x @`` / ``# y #``) or ``none``.
        **kwargs: the rest of :class:`~datamodules.base.PromptDataModule`.
    """

    family = "relation_extraction"

    def __init__(self, entity_markers: str = "brackets", **kwargs):
        if entity_markers not in MARKERS:
            raise DataError(f"data.init_args.entity_markers: '{entity_markers}' is not one of {', '.join(MARKERS)}")
        self.entity_markers = entity_markers
        super().__init__(**kwargs)

    def required_columns(self, split: str) -> list[str]:
        return ["sentence"] + (["label"] if split != "predict" else [])

    kept_what = "an entity marker"

    def must_keep(self, row: dict, split: str) -> tuple[str, int, int] | None:
        """Both marked entities stay in ``{text}`` whatever ``max_length`` cuts (in every split: where the
        entities are is input, not the gold label)."""
        if "{text}" not in self.template.source:
            return None
        start, end = row["entity_span"]
        return "text", start, end

    def prepare_row(self, row: dict) -> dict:
        try:
            text, e1, e2, span = marked_spans(str(row["sentence"]), self.entity_markers)
        except DataError as err:
            raise DataError(f"row {row.get('id')}: {err}") from None
        return {**row, "text": text, "e1": e1, "e2": e2, "entity_span": span}
