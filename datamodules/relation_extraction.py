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
    o1, c1, o2, c2 = MARKERS[style]
    found = {}

    def swap(m: re.Match) -> str:
        if m.group(1) is not None:
            found["e1"] = m.group(1).strip()
            return o1 + m.group(1) + c1
        found["e2"] = m.group(2).strip()
        return o2 + m.group(2) + c2

    text = _TAGGED.sub(swap, sentence)
    if len(found) != 2:
        raise DataError(f"sentence lacks an <e1> or <e2> mention: {sentence!r}")
    return text, found["e1"], found["e2"]


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
        o1, c1, o2, c2 = MARKERS[self.entity_markers]
        text = row["text"]

        def span_of(opening: str, closing: str, mention: str) -> tuple[int, int]:
            at = text.find(opening) if opening else text.find(mention)
            if at < 0:
                return -1, -1
            if not opening:
                return at, at + len(mention)
            close = text.find(closing, at + len(opening))
            return (at, close + len(closing)) if close >= 0 else (-1, -1)

        (a1, b1), (a2, b2) = span_of(o1, c1, row["e1"]), span_of(o2, c2, row["e2"])
        return ("text", min(a1, a2), max(b1, b2)) if min(a1, a2) >= 0 else None

    def prepare_row(self, row: dict) -> dict:
        try:
            text, e1, e2 = mark_entities(str(row["sentence"]), self.entity_markers)
        except DataError as err:
            raise DataError(f"row {row.get('id')}: {err}") from None
        return {**row, "text": text, "e1": e1, "e2": e2}
