"""Relation extraction: readers on the real files, entity markers, and the official SemEval score."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from datamodules.readers import read_split
from datamodules.relation_extraction import mark_entities
from tasks.metrics import semeval_f1
from tasks.spec import SplitSource, load_task

SCORER = "semeval2010_task8/SemEval2010_task8_scorer-v1.2/semeval2010_task8_scorer-v1.2.pl"


def test_semeval_counts_and_labels(data_dir):
    spec = load_task("semeval")
    train = read_split(spec.splits["train"], data_dir, "train", ["sentence", "label"])
    test = read_split(spec.splits["test"], data_dir, "test", ["sentence", "label"])
    assert (len(train), len(test)) == (8000, 2717)
    assert {r["label"] for r in train} == set(spec.labels) and len(spec.labels) == 19


def test_semeval_reader_accepts_crlf(data_dir, tmp_path):
    src = Path(data_dir) / load_task("semeval").splits["train"].file
    crlf = tmp_path / "TRAIN_CRLF.TXT"
    crlf.write_bytes(src.read_bytes().replace(b"\n", b"\r\n"))
    lf = read_split(SplitSource(file=str(src), format="semeval"), data_dir, "train", ["sentence", "label"])
    got = read_split(SplitSource(file=str(crlf), format="semeval"), data_dir, "train", ["sentence", "label"])
    assert got == lf


def test_fewrel_counts_and_split(data_dir, tiny):
    from datamodules import RelationExtractionDataModule

    dm = RelationExtractionDataModule(task="fewrel", backbone=tiny("llama"), data_dir=data_dir)
    rows = dm.load_rows()
    assert (len(rows["train"]), len(rows["validation"]), len(rows["test"])) == (8960, 1120, 1120)
    ids = [set(r["id"] for r in rows[s]) for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    again = RelationExtractionDataModule(task="fewrel", backbone=tiny("llama"), data_dir=data_dir, seed=7).load_rows()
    assert [r["id"] for r in again["test"]] == [r["id"] for r in rows["test"]]
    assert dm.spec.label_words["P177"] == ["crosses"]  # from pid2name.json


@pytest.mark.parametrize("style,expected", [
    ("xml", "The <e1>child</e1> was in the <e2>cradle</e2>."),
    ("brackets", "The [E1] child [/E1] was in the [E2] cradle [/E2]."),
    ("punct", "The @ child @ was in the # cradle #."),
    ("none", "The child was in the cradle."),
])
def test_entity_marker_styles(style, expected):
    text, e1, e2 = mark_entities("The <e1>child</e1> was in the <e2>cradle</e2>.", style)
    assert (text, e1, e2) == (expected, "child", "cradle")


def test_semeval_reader_keeps_quotes_inside_the_sentence(tmp_path):
    """Only the file's wrapping pair of quotes goes: a sentence may open or close with a quote of its own."""
    path = tmp_path / "few.txt"
    path.write_text('1\t"The <e1>cup</e1> held ""tea"" and <e2>milk</e2> ."\nOther\nComment:\n\n'
                    '2\t""Just like real <e1>baseball</e1>," said the <e2>fan</e2>."\nOther\nComment:\n\n'
                    '3\t"A <e1>note</e1> marked "G. <e2>Goodale</e2>.""\nOther\nComment:\n\n')
    rows = read_split(SplitSource(file=str(path), format="semeval"), "", "train", ["sentence", "label"])
    assert [r["sentence"] for r in rows] == ['The <e1>cup</e1> held ""tea"" and <e2>milk</e2> .',
                                             '"Just like real <e1>baseball</e1>," said the <e2>fan</e2>.',
                                             'A <e1>note</e1> marked "G. <e2>Goodale</e2>."']


def test_semeval_hand_computed():
    golds = ["Cause-Effect(e1,e2)", "Cause-Effect(e1,e2)", "Other", "Message-Topic(e2,e1)"]
    preds = ["Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)", "Cause-Effect(e1,e2)", "Message-Topic(e2,e1)"]
    out = semeval_f1(preds, golds)
    # Cause-Effect: 1 exact of 3 predicted (any direction), 2 gold -> P 1/3, R 1/2, F1 0.4
    # Message-Topic: P 1, R 1, F1 1. Macro over the 2 gold relations = 0.7
    assert out["macro_f1"] == pytest.approx(0.7)
    assert out["acc"] == pytest.approx(0.5)


@pytest.mark.skipif(shutil.which("perl") is None, reason="perl not installed")
@pytest.mark.parametrize("noise", [0.0, 0.3, 0.7])
def test_semeval_matches_official_scorer(noise, data_dir, tmp_path):
    spec = load_task("semeval")
    test = read_split(spec.splits["test"], data_dir, "test", ["sentence", "label"])
    rng = random.Random(int(noise * 100))
    golds = [r["label"] for r in test]
    preds = [g if rng.random() >= noise else rng.choice(spec.labels) for g in golds]
    (tmp_path / "pred.txt").write_text("".join(f"{r['id']}\t{p}\n" for r, p in zip(test, preds)))
    (tmp_path / "key.txt").write_text("".join(f"{r['id']}\t{g}\n" for r, g in zip(test, golds)))
    out = subprocess.run(["perl", str(Path(data_dir) / SCORER), str(tmp_path / "pred.txt"), str(tmp_path / "key.txt")],
                         capture_output=True, text=True, check=True).stdout
    official = float(re.search(r"macro-averaged F1 = ([\d.]+)%", out).group(1))
    assert round(100 * semeval_f1(preds, golds)["macro_f1"], 2) == official


def test_a_process_with_no_predictions_still_joins_the_gather(monkeypatch):
    """Under DDP every process must take part in gathering a macro-F1 epoch's predictions, also one
    whose share came out empty; otherwise the others wait for it forever."""
    from types import SimpleNamespace

    import torch

    from prompt_methods import scoring

    calls = []

    def gather(out, mine):
        calls.append(mine)
        out[:] = [mine, ([1, 0], [1, 1])]  # the other process's predictions and golds

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    logged = {}
    module = SimpleNamespace(text_answers=False, metric="semeval_f1", trainer=SimpleNamespace(world_size=2),
                             labels=["Other", "Cause-Effect(e1,e2)"], log=lambda k, v, **kw: logged.__setitem__(k, v))
    scoring.log_epoch_metric(module, "val", [])
    assert calls == [([], [])] and "val/score" in logged


@pytest.mark.parametrize("style", ["brackets", "none", "punct"])
def test_truncation_keeps_both_entities(style, tiny, tmp_path):
    """A sentence whose entities sit past what max_length keeps starts later instead (in every split),
    so both marked entities are in the prompt; a sentence that fits is left whole. The entities are
    where the tags were, not an earlier occurrence of the word or of a marker character."""
    import json

    from datamodules import RelationExtractionDataModule

    filler = " ".join(f"word{i}" for i in range(80))
    rows = [{"sentence": f"item # 3 : the flood came . {filler} the <e1>storm</e1> caused the <e2>flood</e2> .",
             "label": "Cause-Effect(e1,e2)"},
            {"sentence": "The <e1>storm</e1> caused the <e2>flood</e2> .", "label": "Cause-Effect(e1,e2)"}]
    path = tmp_path / "re.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = RelationExtractionDataModule(task="semeval", backbone=tiny("llama"), train_file=str(path), validation_file=str(path),
                                      test_file=str(path), max_length=80, entity_markers=style)
    dm.setup("test")
    long, short = (dm.tokenizer.decode(item["input_ids"]) for item in dm.datasets["test"])
    assert dm.rows_moved == 1
    assert "storm" in long and "caused the" in long and "word0 " not in long and "came" not in long
    if style == "brackets":
        assert "[/E2]" in long
    assert "The" in short and "flood" in short


def test_tokenizer_without_offsets_keeps_the_plain_cut(tiny, tmp_path, monkeypatch):
    """A tokenizer without character offsets (a slow one) cannot locate the kept part: the row is cut
    as before, no error."""
    import json

    from datamodules import RelationExtractionDataModule

    filler = " ".join(f"word{i}" for i in range(80))
    path = tmp_path / "re.jsonl"
    path.write_text(json.dumps({"sentence": f"{filler} the <e1>storm</e1> caused the <e2>flood</e2> .",
                                "label": "Cause-Effect(e1,e2)"}) + "\n")
    dm = RelationExtractionDataModule(task="semeval", backbone=tiny("llama"), train_file=str(path), validation_file=str(path),
                                      test_file=str(path), max_length=80)
    monkeypatch.setattr(type(dm.tokenizer), "is_fast", property(lambda self: False))
    dm.setup("test")
    assert dm.rows_moved == 0 and len(dm.datasets["test"][0]["input_ids"]) <= 80
