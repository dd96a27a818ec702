"""Readers on the real shared files, user files of every format, splits, few-shot sampling, batches."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from datamodules.readers import DataError, read_split
from tasks.spec import SplitSource, TaskError, load_task


@pytest.mark.parametrize("task,counts", [
    ("sst2", {"train": 67349, "validation": 872, "test": 1821}),
    ("trec", {"train": 5452, "test": 500}),
    ("agnews", {"train": 10001, "test": 7600}),
    ("boolq", {"train": 9427, "test": 3270}),
    ("rte", {"train": 2490, "test": 277}),  # parquet; GLUE's unlabeled test file is not read
])
def test_real_files_row_counts(task, counts, data_dir):
    spec = load_task(task)
    for split, n in counts.items():
        rows = read_split(spec.splits[split], data_dir, split, spec.fields + ["label"])
        assert len(rows) == n
        assert {str(r["label"]) for r in rows} <= set(spec.labels)


def test_held_out_validation_is_fixed_and_disjoint(tiny, data_dir):
    from datamodules import ClassificationDataModule

    def rows(seed):
        dm = ClassificationDataModule(task="trec", backbone=tiny("llama"), data_dir=data_dir, seed=seed)
        return dm.load_rows()

    a, b = rows(1), rows(2)
    assert len(a["validation"]) == 500 and len(a["train"]) == 5452 - 500
    assert [r["id"] for r in a["validation"]] == [r["id"] for r in b["validation"]]  # split_seed, not seed
    assert not {r["id"] for r in a["validation"]} & {r["id"] for r in a["train"]}


def test_few_shot_k_per_class_with_seed(tiny, data_dir):
    from datamodules import ClassificationDataModule

    def sample(seed):
        dm = ClassificationDataModule(task="trec", backbone=tiny("llama"), data_dir=data_dir, few_shot_k=8, seed=seed)
        return dm.load_rows()

    a, a2, b = sample(13), sample(13), sample(21)
    assert Counter(r["label"] for r in a["train"]) == {lab: 8 for lab in load_task("trec").labels}
    assert Counter(r["label"] for r in a["validation"]) == {lab: 8 for lab in load_task("trec").labels}
    assert [r["id"] for r in a["train"]] == [r["id"] for r in a2["train"]]
    assert [r["id"] for r in a["train"]] != [r["id"] for r in b["train"]]


def test_each_stage_reads_only_the_splits_it_uses(tiny, data_dir, tmp_path, monkeypatch):
    """A zero-shot test does not tokenize the train split; predict runs without a train file; a split
    held out of train, and few-shot validation, are the same whichever stage comes first."""
    from datamodules import ClassificationDataModule, RelationExtractionDataModule

    dm = ClassificationDataModule(task="sst2", backbone=tiny("llama"), data_dir=data_dir)
    read = []
    real = dm._read
    monkeypatch.setattr(dm, "_read", lambda split: read.append(split) or real(split))
    dm.setup("test")
    assert read == ["test"] and set(dm.datasets) == {"test"}
    dm.setup("validate")
    assert read == ["test", "validation"] and set(dm.datasets) == {"test", "validation"}

    pred = tmp_path / "new.jsonl"
    pred.write_text('{"sentence": "a fine film"}\n')
    dm = ClassificationDataModule(task="sst2", backbone=tiny("llama"), train_file=str(tmp_path / "absent.tsv"),
                                  predict_file=str(pred))
    dm.setup("predict")
    assert [it["id"] for it in dm.datasets["predict"]] == ["predict-0"]
    with pytest.raises(ValueError, match="train file not found"):
        dm.setup("fit")

    # FewRel's test is held out of train; TREC few-shot validation is drawn after train
    fit_first = RelationExtractionDataModule(task="fewrel", backbone=tiny("llama"), data_dir=data_dir)
    fit_first.setup("fit")
    fit_first.setup("test")
    test_only = RelationExtractionDataModule(task="fewrel", backbone=tiny("llama"), data_dir=data_dir)
    test_only.setup("test")
    assert [it["id"] for it in test_only.datasets["test"]] == [it["id"] for it in fit_first.datasets["test"]]
    assert "train" not in test_only.datasets
    kw = dict(task="trec", backbone=tiny("llama"), data_dir=data_dir, few_shot_k=4, seed=5)
    both, alone = ClassificationDataModule(**kw), ClassificationDataModule(**kw)
    both.setup("fit")
    alone.setup("validate")
    assert [it["id"] for it in alone.datasets["validation"]] == [it["id"] for it in both.datasets["validation"]]


ROWS = [{"review": "great film", "stars": "1"}, {"review": "dull film", "stars": "0"}]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_user_file_formats_with_column_mapping(fmt, tmp_path, tiny):
    path = tmp_path / f"data.{fmt}"
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("review" + sep + "stars\n" + "".join(f"{r['review']}{sep}{r['stars']}\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    from datamodules import ClassificationDataModule

    dm = ClassificationDataModule(task="sst2", backbone=tiny("llama"), train_file=str(path), validation_file=str(path),
                                  test_file=str(path), rename={"review": "sentence", "stars": "label"})
    dm.setup()
    assert [it["label"] for it in dm.datasets["train"]] == [1, 0]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "ok", "label": "1"}\n{"sentence": "broken", "label": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_split(SplitSource(file=str(path)), tmp_path, "train", ["sentence", "label"])


@pytest.mark.parametrize("content,match", [
    (None, "train file not found"),
    ("", "train file is empty"),
    ("text\tstars\nfine\t1\n", r"missing column\(s\) \['sentence', 'label'\]"),
    ("sentence\tlabel\nfine\t1\textra\n", r"bad.tsv:2: expected 2 columns"),
])
def test_bad_files_are_named(content, match, tmp_path):
    path = tmp_path / "bad.tsv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_split(SplitSource(file=str(path)), tmp_path, "train", ["sentence", "label"])


def test_unknown_task_lists_known_ones():
    with pytest.raises(TaskError, match="data.init_args.task: 'sst3'.*sst2"):
        load_task("sst3")


def test_batches_pad_left_for_causal_right_for_mlm(make_data, tiny):
    causal = next(iter(make_data(tiny("llama")).val_dataloader()))
    assert (causal["attention_mask"][:, -1] == 1).all()  # answer position last
    assert (causal["answer_pos"] == causal["input_ids"].shape[1] - 1).all()
    dm = make_data(tiny("bert"))
    mlm = next(iter(dm.val_dataloader()))
    assert (mlm["attention_mask"][:, 0] == 1).all()
    picked = mlm["input_ids"].gather(1, mlm["answer_pos"][:, None]).squeeze(1)
    assert (picked == dm.tokenizer.mask_token_id).all()


def test_eval_cap_draws_across_a_grouped_file(tiny, data_dir):
    """SQuAD's questions come grouped by article: a cap draws them across the split (the same draw for
    every run seed), while a task whose file is in no particular order keeps the first N."""
    from datamodules import QuestionAnsweringDataModule

    def rows(**kwargs):
        return QuestionAnsweringDataModule(task="squad", backbone=tiny("llama"), data_dir=data_dir,
                                           **kwargs).load_rows(["validation", "test"])

    full = rows()
    a, b = rows(max_eval_samples=300, seed=1), rows(max_eval_samples=300, seed=2)
    assert len(a["test"]) == len(a["validation"]) == 300
    assert [r["id"] for r in a["test"]] == [r["id"] for r in b["test"]]  # split_seed, not the run seed
    assert len({r["title"] for r in a["test"]}) == len({r["title"] for r in full["test"]}) == 10
    assert len({r["title"] for r in full["test"][:300]}) == 1  # what the first 300 would have been
    order = {r["id"]: i for i, r in enumerate(full["test"])}
    assert [order[r["id"]] for r in a["test"]] == sorted(order[r["id"]] for r in a["test"])  # file order kept
    first = rows(max_eval_samples=300, eval_sample="first")
    assert [r["id"] for r in first["test"]] == [r["id"] for r in full["test"][:300]]
    other = rows(max_eval_samples=300, split_seed=7)
    assert [r["id"] for r in other["test"]] != [r["id"] for r in a["test"]]


def test_max_val_samples_caps_validation_alone(tiny, data_dir):
    from datamodules import ClassificationDataModule

    dm = ClassificationDataModule(task="sst2", backbone=tiny("llama"), data_dir=data_dir, max_val_samples=40)
    got = dm.load_rows(["validation", "test"])
    assert len(got["validation"]) == 40 and len(got["test"]) == 1821
    dm = ClassificationDataModule(task="sst2", backbone=tiny("llama"), data_dir=data_dir, max_val_samples=40,
                                  max_eval_samples=100)
    got, full = dm.load_rows(["validation", "test"]), dm.load_rows(["validation"])
    assert len(got["validation"]) == 40 and len(got["test"]) == 100
    assert [r["id"] for r in got["validation"]] == [r["id"] for r in full["validation"][:40]]  # sst2: eval_sample first


def test_bad_eval_sample_is_named(tiny, tmp_path):
    from datamodules import ClassificationDataModule

    with pytest.raises(DataError, match="data.init_args.eval_sample: 'last'"):
        ClassificationDataModule(task="sst2", backbone=tiny("llama"), eval_sample="last")
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: mine\nfamily: classification\nfields: [text]\nlabels: ['0', '1']\n"
                    "label_words: {'0': bad, '1': good}\ntemplate: '{text} It was {mask}'\neval_sample: middle\n")
    with pytest.raises(TaskError, match=r"mine.yaml: eval_sample must be one of random, first, not 'middle'"):
        load_task(str(spec))


def test_override_files_in_a_datasets_own_shape_take_its_reader(tiny, data_dir, tmp_path):
    """data.init_args.format reads an override file with a built-in task's reader: BoolQ's dev.jsonl
    shape (answer, title) and SemEval's release file, which the extension alone would not pick."""
    from datamodules import QuestionAnsweringDataModule, RelationExtractionDataModule

    dev = tmp_path / "mine.jsonl"
    dev.write_text(json.dumps({"question": "is fire hot", "title": "Fire", "passage": "Fire is hot.", "answer": True}) + "\n")
    with pytest.raises(DataError, match="missing column"):
        QuestionAnsweringDataModule(task="boolq", backbone=tiny("llama"), data_dir=data_dir, test_file=str(dev)).load_rows(["test"])
    dm = QuestionAnsweringDataModule(task="boolq", backbone=tiny("llama"), data_dir=data_dir, test_file=str(dev), format="boolq")
    row = dm.load_rows(["test"])["test"][0]
    assert row["label"] == "True" and row["passage"] == "Fire -- Fire is hot."
    semeval = f"{data_dir}/semeval2010_task8/SemEval2010_task8_testing_keys/TEST_FILE_FULL.TXT"
    dm = RelationExtractionDataModule(task="semeval", backbone=tiny("llama"), data_dir=data_dir, test_file=semeval,
                                      format="semeval")
    assert len(dm.load_rows(["test"])["test"]) == 2717
    with pytest.raises(DataError, match="data.init_args.format: 'xml' is not one of csv, tsv"):
        QuestionAnsweringDataModule(task="boolq", backbone=tiny("llama"), format="xml")


def test_eval_splits_shard_without_repeats_only_under_plain_ddp(make_data, tiny):
    """Under DDP validation and test take EvalSampler shares; FSDP/DeepSpeed (weights gathered in every
    forward) and a fractional limit_val_batches (unequal shares would fail on one process) keep
    Lightning's padded sampler, and predict keeps its own."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from datamodules.sampling import EvalSampler

    dm = make_data(tiny("llama"))

    def sampler(strategy, split="validation", limit=1.0):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=1, limit_val_batches=limit, limit_test_batches=1.0,
                                     strategy=strategy)
        return dm._loader(split, shuffle=False).sampler

    try:
        got = sampler(DDPStrategy())
        assert isinstance(got, EvalSampler) and len(got) == 3 and got.rank == 1  # 6 rows, every other one
        assert isinstance(sampler(DDPStrategy(), "test"), EvalSampler)
        for other in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):
            assert not isinstance(sampler(other), EvalSampler)
        assert not isinstance(sampler(DDPStrategy(), limit=0.5), EvalSampler)
        assert isinstance(sampler(DDPStrategy(), limit=2), EvalSampler)  # a whole number of batches is fine
        assert not isinstance(sampler(DDPStrategy(), "predict"), EvalSampler)
    finally:
        dm.trainer = None


def test_predict_is_not_capped(tiny, data_dir):
    """``max_eval_samples`` caps what is scored; ``predict`` (the test split unless a predict file is
    set) still writes a prediction for every example."""
    from datamodules import ClassificationDataModule

    dm = ClassificationDataModule(task="sst2", backbone=tiny("llama"), data_dir=data_dir, max_eval_samples=100)
    rows = dm.load_rows(["test", "predict"])
    assert len(rows["test"]) == 100 and len(rows["predict"]) == 1821


def test_quoted_tsv_as_pandas_writes_it(tmp_path):
    """GLUE's tsv files keep quote characters as text; a tsv with quoted fields (pandas' default) is
    ``format: tsv_quoted``, and the plain reader's column-count error says so."""
    text = 'sentence\tlabel\n"he said ""wow"""\t1\n"a\ttab, inside"\t0\n'
    path = tmp_path / "pandas.tsv"
    path.write_text(text)
    rows = read_split(SplitSource(file=str(path), format="tsv_quoted"), "", "train", ["sentence", "label"])
    assert [(r["sentence"], r["label"]) for r in rows] == [('he said "wow"', "1"), ("a\ttab, inside", "0")]
    with pytest.raises(DataError, match=r"pandas.tsv:3: expected 2 columns .* found 3 .*format: tsv_quoted"):
        read_split(SplitSource(file=str(path)), "", "train", ["sentence", "label"])
    glue = tmp_path / "glue.tsv"
    glue.write_text('sentence\tlabel\n"quoted" text stays\t1\n')
    assert read_split(SplitSource(file=str(glue)), "", "train", ["sentence", "label"])[0]["sentence"] == '"quoted" text stays'


def test_label_words_file_with_byte_order_mark(tmp_path):
    from datamodules.readers import read_label_words

    path = tmp_path / "pid2name.json"
    path.write_bytes("\ufeff{\"P1\": [\"founded by\", \"desc\"]}".encode("utf-8"))
    assert read_label_words(path) == {"P1": ["founded by"]}
