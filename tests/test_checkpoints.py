"""Prompt-only checkpoints: what they hold, weights-only loading, refusal of another method or
backbone, corrupt files, atomic writes, exact resume, and export to a PEFT adapter folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from prompt_methods.checkpointing import AtomicCheckpointIO, CheckpointError, check_checkpoint_file
from test_cli import run_cli, tiny_args

SOFT = "configs/sst2/soft_prompt.yaml"


def fit(tiny, files, tmp_path, monkeypatch, config=SOFT, steps=2, extra=()):
    args = ["--config", config, *tiny_args(tiny, files, tmp_path), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(min(steps, 2)), *extra]
    cli = run_cli(args, "fit", monkeypatch)
    return cli, tmp_path / "promptlit" / cli.trainer.logger.version / "checkpoints" / "last.ckpt"


@pytest.fixture()
def soft_ckpt(tiny, family_files, tmp_path, monkeypatch):
    return fit(tiny, family_files["sst2"], tmp_path, monkeypatch)


def test_checkpoint_holds_prompt_state_and_metadata_and_loads_weights_only(soft_ckpt):
    cli, ckpt = soft_ckpt
    state = torch.load(ckpt, weights_only=True)  # the whole file, optimizer and loops included
    assert set(state["state_dict"]) == {"prompt", "val_acc_best.max_value", "val_score_best.max_value"}
    assert state["promptlit"]["method"] == "SoftPrompt" and state["promptlit"]["fingerprint"] == cli.model.backbone_fingerprint
    assert state["optimizer_states"] and state["lr_schedulers"] and state["global_step"] == 2
    # the best validation score so far travels too, so a resumed run's val/score_best does not restart
    assert float(state["state_dict"]["val_score_best.max_value"]) == float(cli.trainer.callback_metrics["val/score_best"])
    assert ckpt.stat().st_size < 64 * 1024


def test_last_checkpoint_holds_the_best_tracker_after_its_validation(tiny, family_files, tmp_path, monkeypatch):
    """last.ckpt is written after the best-checkpoint callback has seen the same validation, so a
    resumed run tracks the best file that is on disk, not the one before it."""
    cli, ckpt = fit(tiny, family_files["sst2"], tmp_path, monkeypatch, steps=4)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.index("LastCheckpoint") > names.index("ModelCheckpoint")
    assert len(names) == len(set(names)) and {"PredictionWriter", "Throughput"} <= set(names)
    best = cli.trainer.checkpoint_callback
    saved = next(v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert saved["best_model_path"] == best.best_model_path and torch.load(best.best_model_path, weights_only=False)
    assert float(saved["best_model_score"]) == float(best.best_model_score)
    assert float(saved["current_score"]) == float(cli.trainer.callback_metrics["val/score"])  # this validation's


def test_last_checkpoint_moves_itself_without_skipping_a_callback():
    """Lightning iterates over trainer.callbacks to call setup; LastCheckpoint moving itself to the
    end must not make that loop skip the callback after it or call it twice."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Callback

    from prompt_methods.callbacks import LastCheckpoint

    class Count(Callback):
        calls = 0

        def setup(self, trainer, pl_module, stage):
            self.calls += 1

    last, after, end = LastCheckpoint(), Count(), Count()
    trainer = SimpleNamespace(callbacks=[last, after, end])
    for callback in trainer.callbacks:  # as lightning's _call_callback_hooks does
        callback.setup(trainer, None, "fit")
    assert (after.calls, end.calls) == (1, 1) and trainer.callbacks == [after, end, last]


def test_other_method_is_refused(soft_ckpt, tiny, family_files, tmp_path, monkeypatch):
    _, ckpt = soft_ckpt
    args = ["--config", "configs/sst2/prefix_tuning.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path), "--ckpt_path", str(ckpt)]
    with pytest.raises(CheckpointError, match="written by SoftPrompt, but model.class_path is PrefixTuning"):
        run_cli(args, "test", monkeypatch)


def test_other_backbone_is_refused(soft_ckpt, tiny, family_files, tmp_path, monkeypatch):
    _, ckpt = soft_ckpt
    other = tmp_path / "other-llama"
    model = AutoModelForCausalLM.from_pretrained(tiny("llama"))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)  # same architecture, other weights
    model.save_pretrained(other)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny("llama")).save_pretrained(other)
    args = ["--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path), "--model.init_args.backbone", str(other),
            "--ckpt_path", str(ckpt)]
    with pytest.raises(CheckpointError, match="trained on backbone .* but model.init_args.backbone is"):
        run_cli(args, "test", monkeypatch)


def test_other_prompt_length_is_refused(soft_ckpt, tiny, family_files, tmp_path, monkeypatch):
    _, ckpt = soft_ckpt
    args = ["--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path),
            "--model.init_args.num_virtual_tokens", "7", "--ckpt_path", str(ckpt)]
    with pytest.raises(CheckpointError, match=r"'prompt' has shape \(20, 32\) in the checkpoint but \(7, 32\)"):
        run_cli(args, "test", monkeypatch)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_gets_one_line(soft_ckpt, tiny, family_files, tmp_path, monkeypatch, damage):
    _, ckpt = soft_ckpt
    bad = tmp_path / "bad.ckpt"
    data = ckpt.read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"ckpt_path: {bad} is not a readable checkpoint"):
        check_checkpoint_file(bad)
    args = ["--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path), "--ckpt_path", str(bad)]
    with pytest.raises(SystemExit, match="error: ckpt_path: .* is not a readable checkpoint"):
        run_cli(args, "test", monkeypatch)
    with pytest.raises(SystemExit, match="does not exist"):
        run_cli(["--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path), "--ckpt_path", str(tmp_path / "nope.ckpt")],
                "test", monkeypatch)
    monkeypatch.setenv("PROMPTLIT_TRACEBACK", "1")  # the traceback instead of the one line
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        run_cli(args, "test", monkeypatch)


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_export_writes_a_peft_adapter_that_loads_back(soft_ckpt, tiny, family_files, tmp_path, monkeypatch):
    import train
    from prompt_methods import SoftPrompt

    cli, ckpt = soft_ckpt
    monkeypatch.chdir(train.os.path.dirname(train.__file__))
    out = train.main(["export", "--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path),
                      "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "adapter")])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    back = SoftPrompt(backbone=tiny("llama"), verbalizer=cli.model.verbalizer, adapter=str(out))
    torch.testing.assert_close(back.prompt.detach(), cli.model.prompt.detach().float())
    with pytest.raises(SystemExit, match="written by SoftPrompt, but model.class_path is PTuning"):
        train.main(["export", "--config", "configs/sst2/p_tuning.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
                    "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    saved = next((tmp_path / "promptlit").rglob("config.yaml"))  # the run's own config works too (it holds
    assert "ckpt_path" in saved.read_text()  # fit's ckpt_path, which export's parser has no subcommand for)
    again = train.main(["export", "--config", str(saved), "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "again")])
    assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("extra,message", [
    (["--model.init_args.tune_backbone", "true"], "error: model.init_args.tune_backbone: this run tuned the backbone"),
    (["--model.init_args.readout", "head"], "error: model.init_args.readout: this run trained a new ClassificationHead"),
])
def test_export_refuses_a_run_that_trained_more_than_the_prompt(extra, message, tiny, family_files, tmp_path, monkeypatch):
    """A prompt adapter holds only the prompt: it cannot reproduce a run whose backbone, or a head
    beside the prompt, trained too."""
    import train

    _, ckpt = fit(tiny, family_files["sst2"], tmp_path, monkeypatch, steps=1, extra=extra)
    with pytest.raises(SystemExit, match=message):
        train.main(["export", "--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path), *extra,
                    "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "adapter")])
    assert not (tmp_path / "adapter").exists()


def test_export_config_copies_are_removed_when_a_later_config_is_broken(tmp_path, monkeypatch):
    """A run's saved config is copied without its subcommand keys; a broken --config after it must
    not leave that copy behind."""
    import tempfile

    import train

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    saved = tmp_path / "config.yaml"
    saved.write_text("ckpt_path: null\nseed_everything: 1\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    args, temps = train._without_subcommand_keys(["--config", str(saved)])
    assert len(temps) == 1 and "ckpt_path" not in Path(temps[0]).read_text()  # the copy drops fit's key
    Path(temps[0]).unlink()
    with pytest.raises(SystemExit, match="broken.yaml is not valid YAML"):
        train._without_subcommand_keys([f"--config={saved}", "--config", str(broken)])
    assert list(scratch.iterdir()) == []


def test_ckpt_path_last_or_best_names_the_file_to_pass(soft_ckpt, tiny, family_files, tmp_path, monkeypatch):
    """Under the W&B logger a new command is a new run with an empty folder: Lightning's 'last' would
    find nothing there and train from step 0, and 'best' exists only in the process that ran the fit.
    Both are refused, naming the newest checkpoint; 'last' with the run's id resumes that run."""
    import re

    cli, ckpt = soft_ckpt
    args = ["--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path), "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "2"]
    with pytest.raises(SystemExit, match=rf"error: ckpt_path: 'last': this command starts a new run.*newest is {re.escape(str(ckpt))}"):
        run_cli(args + ["--ckpt_path", "last"], "fit", monkeypatch)
    with pytest.raises(SystemExit, match=r"error: ckpt_path: 'best' is known only inside the process that ran the fit"):
        run_cli(args + ["--ckpt_path", "best"], "test", monkeypatch)
    resumed = run_cli(args + ["--ckpt_path", "last", "--trainer.logger.init_args.id", cli.trainer.logger.version], "fit",
                      monkeypatch)
    assert resumed.trainer.ckpt_path == str(ckpt) and resumed.trainer.global_step == 4


class CrashAt(Callback):
    """Stops a fit with an error before a given step: a run killed mid-training."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


def test_fit_without_validation_still_writes_last_ckpt(tiny, family_files, tmp_path, monkeypatch):
    """With validation off, last.ckpt is written where a validation would have run, so a killed run
    keeps its steps (it used to be written only at the end)."""
    args = ["--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path), "--trainer.max_steps", "6",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "0",
            "--trainer.callbacks+=test_checkpoints.CrashAt"]
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(args, "fit", monkeypatch)
    assert torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)["global_step"] == 2


def test_last_ckpt_written_at_a_step_that_validates_holds_that_validation(tiny, family_files, tmp_path, monkeypatch):
    """every_n_train_steps saves at the batch's end, before that step's validation: the checkpoint is
    written again after it, with the best-checkpoint tracker and the validation loop's state."""
    own = tmp_path / "own"
    args = ["--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path), "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.callbacks+=prompt_methods.callbacks.LastCheckpoint",
            "--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.dirpath", str(own)]
    cli = run_cli(args, "fit", monkeypatch)
    state = torch.load(own / "last.ckpt", weights_only=True)
    tracker = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert tracker["best_model_path"] == cli.trainer.checkpoint_callback.best_model_path != ""
    assert torch.isfinite(state["state_dict"]["val_score_best.max_value"])


def test_resumed_fit_draws_the_same_dropout_masks(tiny, family_files, tmp_path, monkeypatch):
    """Fine-tuning's head has dropout: a fit killed after step 2 and resumed from its last.ckpt ends
    with the weights of an uninterrupted fit only if the random state comes back with the checkpoint."""
    files = family_files["sst2"]

    def args(folder, *extra):
        return ["--config", "configs/sst2/fine_tuning.yaml", *tiny_args(tiny, files, tmp_path / folder),
                "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", *extra]

    whole = run_cli(args("whole"), "fit", monkeypatch).model
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in whole.modules())
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(args("cut", "--trainer.callbacks+=test_checkpoints.CrashAt"), "fit", monkeypatch)
    last = next((tmp_path / "cut").rglob("last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 2
    resumed = run_cli(args("resumed", "--ckpt_path", str(last)), "fit", monkeypatch).model
    trained = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    for name, param in resumed.named_parameters():
        if name in trained:
            torch.testing.assert_close(param, trained[name], rtol=0, atol=1e-6, msg=name)


def test_a_checkpoint_loaded_by_hand_reads_answers_as_trained(soft_ckpt):
    """The label words come from the data module, not the hyperparameters; the checkpoint keeps them,
    so ``load_from_checkpoint`` without a data module scores the same labels (not a text generator)."""
    from prompt_methods import SoftPrompt
    from prompt_methods.readout import CausalLabelWords

    cli, ckpt = soft_ckpt
    back = SoftPrompt.load_from_checkpoint(ckpt).eval()
    assert isinstance(back.readout, CausalLabelWords) and back.labels == cli.model.labels
    assert back.verbalizer == cli.model.verbalizer
    batch = next(iter(cli.datamodule.test_dataloader()))
    model = cli.model.eval().float()
    with torch.no_grad():
        torch.testing.assert_close(back(batch), model(batch))
    words = [[[5]], [[6]]]  # keywords still win over the checkpoint's
    assert SoftPrompt.load_from_checkpoint(ckpt, verbalizer=words, labels=["a", "b"]).verbalizer == words


def test_head_checkpoint_into_a_label_word_readout_is_refused(tiny, family_files, tmp_path, monkeypatch):
    """A trained classification head has no place in a label-word readout: refused, not dropped."""
    head = ["--model.init_args.readout", "head"]
    _, ckpt = fit(tiny, family_files["sst2"], tmp_path, monkeypatch, steps=1, extra=head)
    assert any(k.startswith("readout.") for k in torch.load(ckpt, weights_only=True)["state_dict"])
    args = ["--config", SOFT, *tiny_args(tiny, family_files["sst2"], tmp_path), "--ckpt_path", str(ckpt)]
    with pytest.raises(CheckpointError, match=r"holds the weights of a trained head \(readout.linear.bias, readout.linear.weight\).*model.init_args.readout"):
        run_cli(args, "test", monkeypatch)
