"""Task metrics, computed the way the official scorers compute them.

Each metric takes predicted and gold label names (or answer strings) and returns named values in
[0, 1]. ``METRICS`` maps a task spec's ``metric`` to its function.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_DIRECTION = re.compile(r"\(e[12],e[12]\)$")


def accuracy(preds: list[str], golds: list[str]) -> dict[str, float]:
    return {"acc": sum(p == g for p, g in zip(preds, golds)) / max(1, len(golds))}


def semeval_f1(preds: list[str], golds: list[str], other: str = "Other") -> dict[str, float]:
    """SemEval-2010 Task 8 official score: (9+1)-way macro-F1 with directionality, Other excluded.

    As ``semeval2010_task8_scorer-v1.2.pl``: for each relation R (direction stripped) present in the
    gold labels, P = exact matches / predictions of R in either direction, R = exact matches / gold R;
    F1 per relation, averaged over relations. Micro-F1 pools the same counts; accuracy is 19-way exact.
    """
    def undirected(label: str) -> str:
        return _DIRECTION.sub("", label)

    correct, proposed, gold = Counter(), Counter(), Counter()
    for p, g in zip(preds, golds):
        proposed[undirected(p)] += 1
        gold[undirected(g)] += 1
        if p == g:
            correct[undirected(g)] += 1
    relations = sorted(r for r in gold if r != other)
    f1s = []
    for rel in relations:
        prec = correct[rel] / proposed[rel] if proposed[rel] else 0.0
        rec = correct[rel] / gold[rel]
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    c = sum(correct[r] for r in relations)
    mp = c / max(1, sum(proposed[r] for r in relations))
    mr = c / max(1, sum(gold[r] for r in relations))
    return {
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "micro_f1": 2 * mp * mr / (mp + mr) if mp + mr else 0.0,
        **accuracy(preds, golds),
    }


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lower case, drop punctuation and articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad(preds: list[str], golds: list[list[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1, each the max over the gold answers, averaged over questions."""
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in zip(preds, golds)]
    f1 = [max(_token_f1(p, g) for g in gs) for p, gs in zip(preds, golds)]
    n = max(1, len(golds))
    return {"em": sum(em) / n, "f1": sum(f1) / n}


METRICS = {"accuracy": accuracy, "semeval_f1": semeval_f1, "squad": squad}
