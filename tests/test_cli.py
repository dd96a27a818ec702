"""The CLI: every shipped config parses and runs (fast_dev_run on a tiny model), W&B logs offline,
predict writes its file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import train
from wandb_reader import read_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "benchmark")


def subcommand_of(config: str) -> str:
    """The subcommand a config's first line says it runs with."""
    first = (ROOT / config).read_text().splitlines()[0]
    assert first.startswith("# python train.py "), f"{config}: first line must be the command that runs it"
    return first.split()[3]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses(config, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load((ROOT / config).read_text())
    assert raw["model"]["class_path"].startswith("prompt_methods.")
    assert raw["data"]["class_path"].startswith("datamodules.")
    sub = subcommand_of(config)
    assert sub in ("fit", "validate", "test", "predict")
    capsys.readouterr()
    run_cli(["--config", config, "--print_config"], sub, monkeypatch, expect_exit=True)
    printed = yaml.safe_load(capsys.readouterr().out)  # the parsed config, as LightningCLI resolves it
    assert printed["model"]["class_path"] == raw["model"]["class_path"]
    assert printed["data"]["init_args"]["task"] == raw["data"]["init_args"]["task"]
    for key, value in raw["model"].get("init_args", {}).items():
        assert printed["model"]["init_args"][key] == value, key


def run_cli(extra: list[str], sub: str, monkeypatch, expect_exit: bool = False):
    monkeypatch.chdir(ROOT)
    if expect_exit:
        with pytest.raises(SystemExit) as exc:
            train.main([sub, *extra])
        assert exc.value.code == 0
        return None
    return train.main([sub, *extra])


def tiny_args(tiny, files, tmp_path, task="sst2"):
    """Point a config at the tiny Llama and tiny files of ``task``, logging into ``tmp_path``."""
    return [
        "--model.init_args.backbone", tiny("llama"),
        "--data.init_args.train_file", files["train"],
        "--data.init_args.validation_file", files["validation"],
        "--data.init_args.test_file", files["test"],
        "--data.init_args.batch_size", "3",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.precision", "32-true",
    ]


@pytest.mark.parametrize("config", CONFIGS)
def test_fast_dev_run_every_config(config, tiny, family_files, tmp_path, monkeypatch):
    sub = subcommand_of(config)
    data_args = yaml.safe_load((ROOT / config).read_text())["data"]["init_args"]
    task = data_args["task"]
    extra = []
    if family_files[task] is None:  # same family and reader path as SST-2: run on the SST-2 files
        assert not data_args.get("template"), f"{config}: a task-specific template needs tiny {task} files in family_files"
        task, extra = "sst2", ["--data.init_args.task", "sst2"]
    args = ["--config", config, *tiny_args(tiny, family_files[task], tmp_path), *extra, "--trainer.fast_dev_run", "true"]
    cli = run_cli(args, sub, monkeypatch)
    metrics = cli.trainer.callback_metrics
    key = {"fit": "val/score", "validate": "val/score", "test": "test/score"}[sub]
    assert key in metrics and 0.0 <= float(metrics[key]) <= 1.0
    split = key.split("/")[0]
    assert (f"{split}/f1" in metrics and f"{split}/em" in metrics) if cli.model.text_answers else f"{split}/acc" in metrics
    if cli.model.metric == "semeval_f1":
        assert f"{key.split('/')[0]}/macro_f1" in metrics


def test_fit_then_test_logs_to_wandb_offline(tiny, family_files, tmp_path, monkeypatch):
    args = ["--config", "configs/sst2/soft_prompt.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1"]
    cli = run_cli(args, "fit", monkeypatch)
    logger = cli.trainer.logger
    run_id = logger.version
    cli.trainer.test(cli.model, datamodule=cli.datamodule)  # the test scores go to the same run
    cli.trainer.logger.experiment.finish()
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert [d.name.rsplit("-", 1)[-1] for d in run_dirs] == [run_id], "W&B must write one offline run folder"
    records = read_run(next(run_dirs[0].glob("run-*.wandb")))
    logged = {k for rec in records["history"] for k in rec}
    assert {"train/loss", "train/acc", "val/acc", "params/trainable", "params/total", "test/acc", "test/score"} <= logged
    assert not {"train/acc_step", "train/acc_epoch"} & logged  # one name, as the README lists it
    trainable = [rec["params/trainable"] for rec in records["history"] if "params/trainable" in rec]
    assert trainable == [20 * 32]  # num_virtual_tokens x hidden size of the tiny llama
    assert set(records["tags"]) >= {"sst2", "soft_prompt"}
    config = records["config"]["config"]
    config = config.get("value", config)
    assert config["model"]["class_path"] == "prompt_methods.SoftPrompt"
    run_folder = tmp_path / "promptlit" / run_id
    saved = yaml.safe_load((run_folder / "config.yaml").read_text())
    assert saved["model"]["init_args"]["num_virtual_tokens"] == 20
    assert (run_folder / "checkpoints" / "last.ckpt").exists()


def test_few_shot_epoch_shorter_than_validation_interval(tiny, family_files, tmp_path, monkeypatch):
    """K=1 per class makes a one-batch epoch; the shipped configs' step-count validation still runs."""
    args = ["--config", "configs/sst2/soft_prompt.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
            "--data.init_args.few_shot_k", "1", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]
    cli = run_cli(args, "fit", monkeypatch)
    assert cli.trainer.global_step == 4 and cli.trainer.num_training_batches == 1
    assert "val/acc" in cli.trainer.callback_metrics


def test_trust_remote_code_reaches_the_data_module(tiny, family_files, tmp_path, monkeypatch):
    """The DataModule loads the tokenizer itself: a remote-code backbone needs the model's setting there too."""
    monkeypatch.chdir(ROOT)
    args = ["--config", "configs/sst2/soft_prompt.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
            "--model.init_args.trust_remote_code", "true", "--trainer.logger", "false"]
    cli = train._cli(args, run=False)
    assert cli.datamodule.hparams.trust_remote_code is True and cli.model.hparams.trust_remote_code is True


def test_predict_writes_ids_and_labels(tiny, family_files, tmp_path, monkeypatch):
    out_file = tmp_path / "preds.jsonl"
    args = ["--config", "configs/sst2/hard_prompt.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
            "--trainer.callbacks+=prompt_methods.callbacks.PredictionWriter",
            "--trainer.callbacks.output_file", str(out_file)]
    run_cli(args, "predict", monkeypatch)
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"test-{i}" for i in range(6)]
    assert all(r["pred"] in ("0", "1") and abs(sum(r["probs"].values()) - 1) < 1e-4 for r in rows)
    assert all(r["pred"] == max(r["probs"], key=r["probs"].get) for r in rows)
    from conftest import TRAIN_ROWS

    assert [r["label"] for r in rows] == [label for _, label in TRAIN_ROWS]  # the test file's gold labels, by name


@pytest.mark.parametrize("extra", [[], ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"]])
def test_frozen_hard_prompt_fit_is_a_clear_error(extra, tiny, family_files, tmp_path, monkeypatch):
    """Also when the optimizer comes from the command line, which replaces the method's own."""
    args = ["--config", "configs/sst2/hard_prompt.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path), "--trainer.fast_dev_run",
            "true", *extra]
    with pytest.raises(ValueError, match="tune_backbone: true"):
        run_cli(args, "fit", monkeypatch)


def test_predict_writes_generated_answers(tiny, family_files, tmp_path, monkeypatch):
    out_file = tmp_path / "answers.jsonl"
    args = ["--config", "configs/squad/hard_prompt.yaml", *tiny_args(tiny, family_files["squad"], tmp_path),
            "--model.init_args.max_new_tokens", "3",
            "--trainer.callbacks+=prompt_methods.callbacks.PredictionWriter",
            "--trainer.callbacks.output_file", str(out_file)]
    run_cli(args, "predict", monkeypatch)
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(6)]
    assert all(isinstance(r["answer"], str) and r["gold"] == ["great"] for r in rows)


def test_prompt_checkpoint_is_small_and_reloads(tiny, family_files, tmp_path, monkeypatch):
    import torch

    args = ["--config", "configs/sst2/soft_prompt.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    cli = run_cli(args, "fit", monkeypatch)
    ckpt = tmp_path / "promptlit" / cli.trainer.logger.version / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert set(state) == {"prompt", "val_acc_best.max_value", "val_score_best.max_value"}  # no frozen backbone weights
    assert ckpt.stat().st_size < 64 * 1024
    trained = cli.model.prompt.detach().clone()
    tested = run_cli(["--config", "configs/sst2/soft_prompt.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
                      "--ckpt_path", str(ckpt)], "test", monkeypatch)
    torch.testing.assert_close(tested.model.prompt.detach(), trained)
    assert "test/acc" in tested.trainer.callback_metrics


@pytest.mark.parametrize("method", ["soft_prompt", "prefix_tuning", "p_tuning", "fine_tuning"])
def test_seeded_fit_repeats_itself(method, tiny, family_files, tmp_path, monkeypatch, two_threads):
    """The same config and seed train to bitwise the same weights (two threads, as on a CI machine),
    and the weights did train, so the comparison is of something training computed."""
    import torch

    monkeypatch.chdir(ROOT)

    def fit() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        args = ["--config", f"configs/sst2/{method}.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
                "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--seed_everything", "1",
                "--data.init_args.seed", "1", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
        cli = train._cli(args, run=False)
        start = [p.detach().clone() for p in cli.model.parameters() if p.requires_grad]
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return start, [p.detach().clone() for p in cli.model.parameters() if p.requires_grad]

    (start, first), (_, again) = fit(), fit()
    assert len(first) == len(again) > 0
    assert any(not torch.equal(a, s) for a, s in zip(first, start))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_optimizer_from_the_command_line_trains_the_prompt_only(tiny, family_files, tmp_path, monkeypatch):
    """LightningCLI's --optimizer and --lr_scheduler replace the method's AdamW and schedule: the prompt
    trains with them, the frozen backbone stays as it was."""
    import torch

    monkeypatch.chdir(ROOT)
    args = ["--config", "configs/sst2/soft_prompt.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
            "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.5", "--optimizer.momentum", "0.9",
            "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5"]
    cli = train._cli(args, run=False)
    model = cli.model
    prompt = model.prompt.detach().clone()
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and "momentum_buffer" in optimizer.state[model.prompt]
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.StepLR)
    assert optimizer.param_groups[0]["lr"] < 0.5  # the scheduler stepped
    assert not torch.equal(model.prompt.detach(), prompt)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone[key]), key


def test_lr_scheduler_without_optimizer_is_refused(tiny, family_files, tmp_path, monkeypatch):
    """LightningCLI would drop it without a word and train with the method's own schedule."""
    args = ["--config", "configs/sst2/soft_prompt.yaml", *tiny_args(tiny, family_files["sst2"], tmp_path),
            "--trainer.fast_dev_run", "true", "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size", "1"]
    with pytest.raises(ValueError, match="lr_scheduler: takes effect only with --optimizer"):
        run_cli(args, "fit", monkeypatch)


CORP = {"base_url": "http://wandb.corp:8080"}


@pytest.mark.parametrize("env,saved,netrc_key,offline", [
    ({}, {}, False, True),                                  # nothing: offline, nothing waits on the network
    ({}, {}, True, False),                                  # `wandb login` stored a key
    ({"WANDB_API_KEY": "x" * 40}, {}, False, False),
    ({"WANDB_MODE": "online"}, {}, False, False),           # asked for
    ({"WANDB_MODE": "offline", "WANDB_API_KEY": "x" * 40}, {}, True, True),
    ({"WANDB_BASE_URL": "http://wandb.corp:8080"}, {}, True, False),  # a server of one's own: netrc names host:port
    ({"WANDB_BASE_URL": "http://other.corp"}, {}, True, True),        # a key for another server
    ({}, {"global": CORP}, True, False),                    # `wandb login --host http://wandb.corp:8080`
    ({"WANDB_BASE_URL": "http://other.corp"}, {"global": CORP}, True, True),  # the variable beats the file
    ({}, {"global": {"mode": "offline"}}, True, True),      # `wandb offline`
    ({}, {"global": {"mode": "offline"}, "workspace": {"mode": "online"}}, False, False),  # the workspace's wins
    ({"WANDB_MODE": "online"}, {"workspace": {"mode": "offline"}}, False, False),         # the variable beats it
])
def test_wandb_goes_online_with_a_key_or_when_asked(env, saved, netrc_key, offline, tmp_path, monkeypatch):
    from prompt_methods.callbacks import wandb_offline

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))  # W&B's settings files, as `wandb` writes them
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "root"))
    for where, folder in (("global", tmp_path / "config"), ("workspace", tmp_path / "root" / "wandb")):
        if where in saved:
            folder.mkdir(parents=True)
            (folder / "settings").write_text("[default]\n" + "".join(f"{k} = {v}\n" for k, v in saved[where].items()))
    rc = tmp_path / "netrc"
    corp = "corp" in env.get("WANDB_BASE_URL", "") or saved.get("global") == CORP
    machine = "wandb.corp:8080" if corp else "api.wandb.ai"
    rc.write_text(f"machine {machine}\n  login user\n  password " + "k" * 40 + "\n" if netrc_key else "")
    rc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(rc))
    assert wandb_offline() is offline
    assert train.default_trainer()["logger"]["init_args"]["offline"] is offline


def test_help_lists_export_and_export_has_help(capsys):
    """export is promptlit's own command beside LightningCLI's: the top-level help names it, and
    ``export --help`` prints its usage instead of an error."""
    assert train.main(["export", "--help"]) is None
    out = capsys.readouterr().out
    assert out.startswith("usage: train.py export --config") and "--ckpt_path" in out and "--out_dir" in out
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train.py export" in out and "{fit,validate,test,predict}" in out
