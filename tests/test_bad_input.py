"""The bad-input table, end to end through ``train.py``: every row gets a clear error naming the
config key or file at fault (or is handled), and nothing is left half-written.

Checkpoint rows (corrupt file, another method or backbone) are in ``test_checkpoints.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from test_cli import ROOT, run_cli, tiny_args

SOFT = "configs/sst2/soft_prompt.yaml"


def nothing_half_written(folder) -> None:
    """No temporary files anywhere, and every checkpoint there loads."""
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    for ckpt in folder.rglob("*.ckpt"):
        torch.load(ckpt, weights_only=True)


def fails(args, sub, monkeypatch, tmp_path, error, match):
    with pytest.raises(error, match=match) as got:
        run_cli(args, sub, monkeypatch)
    assert "Given value" not in str(got.value)  # the class's own error, not jsonargparse's wrapper around it
    assert not list(tmp_path.rglob("*.ckpt"))  # it stopped before writing anything
    nothing_half_written(tmp_path)


def base(tiny, files, tmp_path, config=SOFT, backbone=None):
    args = ["--config", config, *tiny_args(tiny, files, tmp_path), "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "1"]
    return args + (["--model.init_args.backbone", backbone] if backbone else [])


@pytest.mark.parametrize("template,match", [
    ("Review: {sentence} {stars} Sentiment: {mask}", r"data.init_args.template: unknown placeholder '\{stars\}'"),
    ("Review: {sentence} {mask", r"data.init_args.template: unbalanced '\{'"),
    ("{soft:2} Sentiment: {mask}", r"data.init_args.template: .* uses none of the task's fields \(\{sentence\}\)"),
])
def test_template_with_unknown_field_or_placeholder(template, match, tiny, family_files, tmp_path, monkeypatch):
    args = base(tiny, family_files["sst2"], tmp_path) + ["--data.init_args.template", template]
    fails(args, "fit", monkeypatch, tmp_path, ValueError, match)


def test_classification_template_without_answer_slot(tiny, family_files, tmp_path, monkeypatch):
    args = base(tiny, family_files["sst2"], tmp_path) + ["--data.init_args.template", "Review: {sentence} Sentiment:"]
    fails(args, "fit", monkeypatch, tmp_path, ValueError, r"data.init_args.template: .*\{mask\}")


def test_label_missing_from_verbalizer(tiny, family_files, tmp_path, monkeypatch):
    bad = tmp_path / "train.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nmeh\t7\n")
    args = base(tiny, family_files["sst2"], tmp_path) + ["--data.init_args.train_file", str(bad)]
    fails(args, "fit", monkeypatch, tmp_path, ValueError, rf"train split of {bad} \(train-1\): label '7' is not in data.init_args.label_words")


def test_empty_or_whitespace_text_is_handled(tiny, family_files, tmp_path, monkeypatch):
    rows = tmp_path / "blank.tsv"
    rows.write_text("sentence\tlabel\n\t1\n   \t0\nfine\t1\n")
    out = tmp_path / "pred.jsonl"
    args = base(tiny, family_files["sst2"], tmp_path) + ["--data.init_args.predict_file", str(rows),
                                                         "--trainer.callbacks+=prompt_methods.callbacks.PredictionWriter",
                                                         "--trainer.callbacks.output_file", str(out)]
    run_cli(args, "predict", monkeypatch)
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == 3 and all(abs(sum(p["probs"].values()) - 1) < 1e-4 for p in preds)


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    ("", "is empty"),
    ('{"sentence": "ok", "label": "1"}\n{"sentence": "cut off", "label": \n', r"train.jsonl:2: not valid JSON"),
    ('{"text": "ok", "stars": "1"}\n', r"train.jsonl.*missing column"),
    ('{"sentence": "ok", "label": "1"}\n{"sentence": "no label"}\n', r"train.jsonl: row 1 \(id 'train-1'\) has no label"),
    ('{"sentence": "ok", "label": "1"}\n{"sentence": null, "label": "0"}\n', r"train.jsonl: row 1 .* has no sentence"),
])
def test_missing_empty_or_malformed_data_file(content, match, tiny, family_files, tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    if content is not None:
        path.write_text(content)
    args = base(tiny, family_files["sst2"], tmp_path) + ["--data.init_args.train_file", str(path)]
    fails(args, "fit", monkeypatch, tmp_path, ValueError, match)


def test_max_length_shorter_than_template(tiny, family_files, tmp_path, monkeypatch):
    args = base(tiny, family_files["sst2"], tmp_path) + ["--data.init_args.max_length", "3"]
    fails(args, "fit", monkeypatch, tmp_path, ValueError, "data.init_args.max_length")


def plain_encoder(tiny, folder):
    """A BERT encoder without an MLM head (as the packaged MiniLM)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    BertModel(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny("bert")).save_pretrained(folder)
    return str(folder)


def test_lm_head_method_on_encoder_only_backbone(tiny, family_files, tmp_path, monkeypatch):
    enc = plain_encoder(tiny, tmp_path / "encoder")
    args = base(tiny, family_files["sst2"], tmp_path, backbone=enc) + ["--model.init_args.readout", "label_words"]
    with pytest.raises(ValueError) as err:
        run_cli(args, "fit", monkeypatch)
    assert str(err.value).startswith("model.init_args.readout: label_words needs a backbone with an LM head")
    assert str(err.value).count("model.init_args.readout") == 1
    nothing_half_written(tmp_path)


@pytest.mark.parametrize("sub", ["test", "validate"])
def test_untrained_head_is_not_scored(tiny, family_files, tmp_path, monkeypatch, sub):
    """A zero-shot hard prompt on an encoder without an LM head would score a new, random head."""
    enc = plain_encoder(tiny, tmp_path / "encoder")
    args = base(tiny, family_files["sst2"], tmp_path, "configs/sst2/hard_prompt.yaml", backbone=enc)
    fails(args, sub, monkeypatch, tmp_path, ValueError, rf"model.init_args.readout: .*untrained: {sub} needs a fitted run")
    # after fit the head is trained: the same run validates
    cli = run_cli(args, "fit", monkeypatch)
    assert cli.trainer.global_step == 2 and cli.model.head_trained
    result = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    assert 0.0 <= result[0]["val/score"] <= 1.0


def test_prefix_tuning_on_backbone_without_cache(tiny, family_files, tmp_path, monkeypatch):
    args = base(tiny, family_files["sst2"], tmp_path, "configs/sst2/prefix_tuning.yaml", backbone=tiny("t5"))
    fails(args, "fit", monkeypatch, tmp_path, ValueError, "model.class_path: PrefixTuning needs .* key/value cache")


def test_tokenizer_without_pad_token_is_handled(tiny, family_files, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    folder = tmp_path / "nopad"
    shutil.copytree(tiny("llama"), folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    cli = run_cli(base(tiny, family_files["sst2"], tmp_path, backbone=str(folder)), "fit", monkeypatch)
    assert cli.trainer.global_step == 2 and cli.model.tokenizer.pad_token_id is not None


class PoisonAt(Callback):
    """Makes the prompt NaN before a given step: what a diverging run looks like."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            with torch.no_grad():
                pl_module.prompt.fill_(float("nan"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny, family_files, tmp_path, monkeypatch):
    args = base(tiny, family_files["sst2"], tmp_path) + ["--trainer.max_steps", "5",
                                                         "--trainer.callbacks+=test_bad_input.PoisonAt"]
    with pytest.raises(FloatingPointError, match="loss is nan at global step 2"):
        run_cli(args, "fit", monkeypatch)
    nothing_half_written(tmp_path)
    last = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert last["global_step"] == 2 and torch.isfinite(last["state_dict"]["prompt"]).all()


def test_unknown_backbone_alias_or_path(tiny, family_files, tmp_path, monkeypatch):
    args = base(tiny, family_files["sst2"], tmp_path, backbone="no-such-model-here")
    fails(args, "fit", monkeypatch, tmp_path, ValueError, "model.init_args.backbone: 'no-such-model-here'")


def test_command_line_shows_one_line_not_a_traceback(tiny, family_files, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "fit", *base(tiny, family_files["sst2"], tmp_path),
                           "--data.init_args.template", "Review: {sentence} {stars} {mask}"],
                          cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.init_args.template: unknown placeholder")


@pytest.mark.parametrize("extra,expected", [
    (["--model.init_args.num_virtual_token", "4"],
     "error: model.init_args.num_virtual_token: SoftPrompt takes no such option; did you mean 'num_virtual_tokens'?"),
    (["--model", "prompt_methods.SoftPrompts"],
     "error: model.class_path: 'prompt_methods.SoftPrompts' is not a class in prompt_methods; did you mean 'prompt_methods.SoftPrompt'?"),
    (["--config", "configs/sst2/soft_promt.yaml"], "error: --config: File does not exist: "),
    (["--model.init_args.lr", "abc"], "error: model.init_args.lr: Expected a <class 'float'>. Got value: abc"),
    (["--trainer.precision", "bf17"], "error: trainer.precision: 'bf17' is not accepted; expected "),
])
def test_misspelled_option_class_or_config_is_one_line(extra, expected):
    """The first mistakes a new user makes: one line naming the key and the nearest valid one, not the
    usage block and jsonargparse's dump of every union member it tried."""
    proc = subprocess.run([sys.executable, "train.py", "fit", "--config", SOFT, *extra], cwd=ROOT, capture_output=True,
                          text=True, env={**__import__("os").environ, "WANDB_MODE": "offline"}, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-2000:]


def test_unanswerable_question_is_a_clear_error(tiny, tmp_path):
    """SQuAD 2.0-style rows (no answers) would otherwise give a batch without targets and an empty max()."""
    from datamodules import QuestionAnsweringDataModule
    from datamodules.readers import DataError

    path = tmp_path / "squad2.json"
    qas = [{"id": "q0", "question": "How was the film?", "answers": [{"text": "great", "answer_start": 13}]},
           {"id": "q1", "question": "Who directed it?", "answers": [], "is_impossible": True}]
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": "The film was great and the acting was wonderful.", "qas": qas}]}]}))
    for backbone in (tiny("llama"), tiny("bert")):  # generated and extracted answers
        dm = QuestionAnsweringDataModule(task="squad", backbone=backbone, train_file=str(path),
                                         validation_file=str(path), test_file=str(path))
        with pytest.raises(DataError, match=r"squad2.json \(q1\): 'answers' is empty"):
            dm.setup()


def test_few_shot_sampling_refuses_unknown_labels(tiny, tmp_path):
    """K-per-class sampling would skip rows whose label has no label words and leave an empty train set."""
    from datamodules import ClassificationDataModule
    from datamodules.readers import DataError

    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"sentence": f"review {i}", "label": lab}) + "\n"
                            for i, lab in enumerate(["pos", "neg"] * 4)))
    dm = ClassificationDataModule(task="sst2", backbone=tiny("llama"), train_file=str(path), validation_file=str(path),
                                  test_file=str(path), few_shot_k=2)
    with pytest.raises(DataError, match=r"train split of .*reviews.jsonl \(train-0\): label 'pos' is not in data.init_args.label_words"):
        dm.setup()


def test_more_positions_than_the_position_table(tiny, family_files, tmp_path, monkeypatch):
    """BERT-style learned positions end at max_position_embeddings: input plus prompt past that is named,
    not an IndexError from the embedding lookup."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    folder = tmp_path / "short-bert"
    BertForMaskedLM(BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(tiny("bert"))), hidden_size=32,
                               num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=24)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny("bert")).save_pretrained(folder)
    args = base(tiny, family_files["sst2"], tmp_path, backbone=str(folder))  # 20 soft tokens + the input > 24
    fails(args, "fit", monkeypatch, tmp_path, ValueError,
          r"data.init_args.max_length: a batch needs \d+ positions .* more than the 24 this backbone has")
    # within the table it trains
    cli = run_cli(args + ["--model.init_args.num_virtual_tokens", "2", "--data.init_args.max_length", "20"], "fit", monkeypatch)
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize("config", [SOFT, "configs/sst2/prefix_tuning.yaml"])
def test_init_text_without_tokens(config, tiny, family_files, tmp_path, monkeypatch):
    """A WordPiece tokenizer turns whitespace into no tokens at all."""
    args = base(tiny, family_files["sst2"], tmp_path, config, backbone=tiny("bert")) + ["--model.init_args.init", "text",
                                                                 "--model.init_args.init_text", " "]
    fails(args, "fit", monkeypatch, tmp_path, ValueError, r"model.init_args.init_text: ' ' has no tokens")


def test_held_out_split_larger_than_train(tiny, family_files):
    """FewRel's test split is held out of train: a small user train file names the task's test_size."""
    from datamodules import RelationExtractionDataModule
    from datamodules.readers import DataError

    dm = RelationExtractionDataModule(task="fewrel", backbone=tiny("llama"), train_file=family_files["fewrel"]["train"])
    with pytest.raises(DataError, match=r"task fewrel's test_size=1120 does not fit a train split of 6 rows"):
        dm.setup("test")
    dm = RelationExtractionDataModule(task="fewrel", backbone=tiny("llama"), train_file=family_files["fewrel"]["train"],
                                      test_file=family_files["fewrel"]["test"], validation_size=50)
    with pytest.raises(DataError, match=r"data.init_args.validation_size=50 does not fit a train split of 6 rows"):
        dm.setup("fit")


def test_odd_lstm_encoder_width_is_named(tiny):
    """The bidirectional LSTM gives each direction half of encoder_hidden: an odd width cannot be split."""
    from prompt_methods import PTuning

    with pytest.raises(ValueError, match="model.init_args.encoder_hidden: 15 must be an even number"):
        PTuning(backbone=tiny("llama"), verbalizer=[[[5]], [[6]]], num_virtual_tokens=3, encoder_hidden=15)
    model = PTuning(backbone=tiny("llama"), verbalizer=[[[5]], [[6]]], num_virtual_tokens=3, encoder="mlp",
                    encoder_hidden=15)  # the MLP encoder has no halves
    assert model.prompt_encoder().shape == (3, model.hidden_size)


def test_text_answer_method_built_without_a_verbalizer(tiny):
    """Generation needs no label words: None is as good as the empty list the CLI links."""
    from prompt_methods import SoftPrompt

    model = SoftPrompt(backbone=tiny("llama"), verbalizer=None, readout="generate", num_virtual_tokens=2)
    assert model.text_answers and model.num_labels == 1


def test_backbone_folder_without_tokenizer_or_weights(tiny, family_files, tmp_path, monkeypatch):
    """A folder with a config but no tokenizer files, or no weights, names model.init_args.backbone."""
    source = Path(tiny("llama"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(source / "config.json", bare / "config.json")
    fails(base(tiny, family_files["sst2"], tmp_path / "a", backbone=str(bare)), "fit", monkeypatch, tmp_path / "a",
          ValueError, rf"^model.init_args.backbone: cannot load a tokenizer from {bare}")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(source, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    fails(base(tiny, family_files["sst2"], tmp_path / "b", backbone=str(no_weights)), "fit", monkeypatch, tmp_path / "b",
          ValueError, rf"^model.init_args.backbone: cannot load {no_weights} as a causal model")


@pytest.mark.parametrize("text,match", [
    ("name: t\nfamily: classification\nfields: [sentence]\nlabelz: [a]\n", r"unexpected keyword argument 'labelz'"),
    ("name: [unclosed\n", r"not a valid YAML task file"),
    ("name: t\nfamily: classification\nfields: [sentence]\nlabels: ['0', '1']\n"
     "label_words: {'0': bad, '1': good}\ntemplate: '{sentense} {mask}'\n", r": template: unknown placeholder '\{sentense\}'"),
])
def test_broken_task_file_is_named(text, match, tiny, family_files, tmp_path, monkeypatch):
    """Errors in a user's task YAML name that file (not data.init_args.template, which the user never set)."""
    task = tmp_path / "mytask.yaml"
    task.write_text(text)
    args = base(tiny, family_files["sst2"], tmp_path) + ["--data.init_args.task", str(task)]
    fails(args, "fit", monkeypatch, tmp_path, ValueError, rf"^{task}.*{match}")


def test_data_file_that_is_not_utf8(tiny, family_files, tmp_path, monkeypatch):
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("sentence\tlabel\ncaf\xe9 au lait\t1\n".encode("latin-1"))
    args = base(tiny, family_files["sst2"], tmp_path) + ["--data.init_args.train_file", str(latin)]
    fails(args, "fit", monkeypatch, tmp_path, ValueError, rf"^{latin}: not UTF-8 text")


@pytest.mark.parametrize("key,value,match", [
    ("data.init_args.batch_size", "0", "data.init_args.batch_size: 0 must be a positive integer"),
    ("data.init_args.eval_batch_size", "-4", "data.init_args.eval_batch_size: -4 must be a positive integer"),
    ("data.init_args.max_eval_samples", "-3", r"data.init_args.max_eval_samples: -3 must be a positive integer \(null"),
    ("data.init_args.few_shot_k", "0", "data.init_args.few_shot_k: 0 must be a positive integer"),
    ("model.init_args.lr", "-0.1", r"model.init_args.lr: -0.1 must be above 0"),
    ("model.init_args.warmup_ratio", "1.5", r"model.init_args.warmup_ratio: 1.5 must be in \[0, 1\)"),
])
def test_out_of_range_numbers_are_named(key, value, match, tiny, family_files, tmp_path, monkeypatch):
    fails(base(tiny, family_files["sst2"], tmp_path) + [f"--{key}", value], "fit", monkeypatch, tmp_path, ValueError,
          f"^{match}")


def test_missing_relative_data_file_says_where_it_looked(tiny, family_files):
    from datamodules import ClassificationDataModule
    from datamodules.readers import DataError

    dm = ClassificationDataModule(task="sst2", backbone=tiny("llama"), data_dir="/nowhere/data")
    with pytest.raises(DataError, match=r"test file not found: /nowhere/data/sst2/.*relative to "
                                        r"data.init_args.data_dir=/nowhere/data; set it, or PROMPTLIT_DATA"):
        dm.setup("test")


def test_model_keys_linked_from_the_data_are_refused(tiny, family_files, tmp_path, monkeypatch):
    """The metric, label words and labels come from the task: a value for the model's copy was dropped silently."""
    fails(base(tiny, family_files["sst2"], tmp_path) + ["--model.init_args.metric", "macro_f1"], "fit", monkeypatch,
          tmp_path, ValueError, r"^model.init_args.metric: set from data \(the task's metric")
