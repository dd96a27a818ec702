"""promptlit entry point: ``python train.py fit|validate|test|predict --config configs/<task>/<method>.yaml``.

``python train.py export --config <the run's config> --ckpt_path <checkpoint> --out_dir <folder>``
writes a soft prompt, prefix or P-tuning checkpoint as a Hugging Face PEFT adapter folder.

Bad input (templates, data files, backbones, checkpoints) ends with one ``error: <key or file>: ...``
line; set ``PROMPTLIT_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.readers import DataError
from prompt_methods.backbone import BackboneError
from prompt_methods.callbacks import LoggedSaveConfig, wandb_offline
from prompt_methods.checkpointing import CheckpointError, check_checkpoint_file
from prompt_methods.peft_format import AdapterError
from tasks.spec import TaskError
from tasks.template import TemplateError


def method_name(class_path: str) -> str:
    """``prompt_methods.SoftPrompt`` -> ``soft_prompt``: the one name a method has everywhere."""
    name = class_path.rsplit(".", 1)[-1]
    return {"PTuning": "p_tuning"}.get(name, re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower())


#: errors whose message names the config key or file at fault
NAMED_ERRORS = (BackboneError, CheckpointError, AdapterError, DataError, TaskError, TemplateError, FileNotFoundError)


def fail(err: BaseException):
    """End with one ``error:`` line naming the key or file at fault (the traceback with
    ``PROMPTLIT_TRACEBACK`` set). Call it inside the ``except`` block that caught ``err``."""
    if os.environ.get("PROMPTLIT_TRACEBACK"):
        raise err
    raise SystemExit(f"error: {err}") from None


def named_error(err: BaseException) -> BaseException | None:
    """The first error under ``err`` (its causes, and contexts not suppressed with ``from None``) that
    names the config key or file at fault, if any: what a class raised inside jsonargparse's wrapper."""
    seen, current = set(), err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, NAMED_ERRORS) or re.match(r"^(data|model|trainer|ckpt_path)[.:]", str(current)):
            return current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def config_error(message: str) -> str:
    """jsonargparse's message about a config (a union dump of every subtype it tried) as one line that
    names the key at fault and, for a misspelled option or class, the nearest valid one."""
    import difflib
    import importlib
    import inspect

    keys = re.findall(r'Parser key "([^"]+)"', message)
    option = re.search(r"Option '([^']+)' is not accepted", message)
    class_path = re.search(r"class_path '([^']+)'", message)
    where = keys[0] if keys else ""
    if len(keys) > 1:  # a key inside a class's init_args, or a nested group
        where = f"{keys[0]}.init_args.{keys[-1]}" if class_path else ".".join(keys)
    if option and class_path:
        module, _, name = class_path.group(1).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
            valid = {p for c in inspect.getmro(cls) if "__init__" in vars(c)
                     for p in inspect.signature(c.__init__).parameters if p not in ("self", "args", "kwargs")}
        except (ImportError, AttributeError, TypeError, ValueError):
            valid = set()
        near = difflib.get_close_matches(option.group(1), sorted(valid), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        return f"{where}.init_args.{option.group(1)}: {name} takes no such option{hint}"
    missing = re.search(r"module '([^']+)' has no attribute '([^']+)'", message)
    if missing and class_path:
        try:
            names = [n for n, v in vars(importlib.import_module(missing.group(1))).items() if inspect.isclass(v)]
        except ImportError:
            names = []
        near = difflib.get_close_matches(missing.group(2), names, n=1)
        hint = f"; did you mean '{missing.group(1)}.{near[0]}'?" if near else ""
        return f"{where}.class_path: '{class_path.group(1)}' is not a class in {missing.group(1)}{hint}"
    if where == "config":  # --config: the file
        return "--config: " + message.split(":", 1)[1].strip()
    given = re.search(r"^\s*Given value: (.*)$", message, re.M)
    expected = [e for e in re.findall(r"Expected a (.+)", message) if "NoneType" not in e]
    if given and len(expected) > 1:  # a union of types or literals (trainer.precision)
        return f"{where}: {given.group(1).strip()!r} is not accepted; expected {' or '.join(expected)}"
    boilerplate = ("Does not validate", "Subtypes", "Errors:", "Expected a <class 'NoneType'>", "Given value",
                   "Problem with given", "Parser key")
    detail = " ".join(line.strip(" -") for line in message.splitlines()
                      if line.strip(" -") and not line.strip(" -").startswith(boilerplate))
    return f"{where}: {detail}" if where else detail or message


class OneLineErrorParser(LightningArgumentParser):
    """A parser whose errors are one ``error:`` line (:func:`config_error`), not the usage block and
    jsonargparse's union dump; ``--help`` still shows the usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        sys.stderr.write(f"error: {config_error(message)} (train.py <command> --help lists the options)\n")
        self.exit(2)


class PromptCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")
        parser.link_arguments("model.init_args.backbone_kind", "data.init_args.backbone_kind")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")
        parser.link_arguments("data.verbalizer", "model.init_args.verbalizer", apply_on="instantiate")
        parser.link_arguments("data.labels", "model.init_args.labels", apply_on="instantiate")
        parser.link_arguments("data.metric", "model.init_args.metric", apply_on="instantiate")
        parser.set_defaults({"trainer.callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"monitor": "val/score", "mode": "max", "save_top_k": 1}},
            {"class_path": "prompt_methods.callbacks.LastCheckpoint"},
            {"class_path": "prompt_methods.callbacks.PredictionWriter"},
            {"class_path": "prompt_methods.callbacks.Throughput"},
        ]})
        parser.set_defaults({"trainer.plugins": [{"class_path": "prompt_methods.checkpointing.AtomicCheckpointIO"}]})

    def instantiate_classes(self) -> None:
        """Surface the error a class raised (it names its config key) instead of jsonargparse's wrapper,
        which repeats the whole parsed namespace."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            named = named_error(err)
            if named is not None:
                raise named from None
            raise

    def _parse_ckpt_path(self) -> None:
        """The config decides the method and backbone; a checkpoint is only checked here.

        LightningCLI would overwrite the model's config with the hyperparameters stored in the
        checkpoint, silently replacing a method or backbone the user asked for. promptlit instead
        refuses a checkpoint that does not fit the config (see ``prompt_methods.checkpointing``).
        """
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path:
            try:
                if path in ("last", "best"):
                    path = self.config[sub]["ckpt_path"] = resolve_named_checkpoint(path, self.config[sub])
                check_checkpoint_file(path)
            except CheckpointError as err:
                fail(err)

    def before_instantiate_classes(self) -> None:
        """Refuse values for the model keys linked from the data module; tag W&B runs with task and
        method, and name them after both."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        given = cfg.model.get("init_args") or {}
        for key, source, default in (("metric", "the task's metric", "accuracy"), ("verbalizer", "the label words", None),
                                     ("labels", "the task's labels", None)):
            if key in given and given[key] != default:  # linked from the data module: a value given here would be dropped
                raise ValueError(f"model.init_args.{key}: set from data ({source}: data.init_args.task, or the task "
                                 f"file), not here; remove {given[key]!r}")
        if cfg.get("lr_scheduler") and not cfg.get("optimizer"):  # LightningCLI would drop it without a word
            raise ValueError("lr_scheduler: takes effect only with --optimizer; the methods' own AdamW has its schedule "
                             "in model.init_args.warmup_ratio (linear warm-up, then linear decay)")
        logger = cfg.trainer.get("logger")
        if not logger or not isinstance(logger, dict) and not hasattr(logger, "init_args"):
            return
        task = os.path.splitext(os.path.basename(str(cfg.data.init_args.task)))[0]
        method = method_name(cfg.model.class_path)
        args = logger.init_args
        if "WandbLogger" in str(logger.class_path):
            args["tags"] = sorted({*(args.get("tags") or []), task, method})
            args["name"] = args.get("name") or f"{task}-{method}"
            args["group"] = args.get("group") or task


def resolve_named_checkpoint(name: str, cfg) -> str:
    """``--ckpt_path last``/``best`` under the W&B logger: a new W&B run gets a new folder, where
    Lightning's ``last`` finds nothing (it would warn and train from scratch), and ``best`` exists only
    inside the process that ran the fit. ``last`` of a run named by ``trainer.logger.init_args.id`` is
    that run's ``last.ckpt``; otherwise both are refused, naming the newest checkpoint to pass instead.
    Other loggers (and none) keep Lightning's own lookup."""
    logger = cfg.trainer.get("logger")
    class_path = (logger.get("class_path") if isinstance(logger, dict) else getattr(logger, "class_path", "")) if logger else ""
    if "WandbLogger" not in str(class_path):  # no logger (checkpoints in <default_root_dir>/checkpoints), or
        return name  # one that numbers its runs: Lightning's own lookup
    args = (logger.get("init_args") if isinstance(logger, dict) else getattr(logger, "init_args", None)) or {}
    runs = Path(args.get("save_dir") or "outputs") / str(args.get("project") or "promptlit")  # one folder per run id
    run = args.get("id") or args.get("version")
    if name == "last" and run and (runs / str(run) / "checkpoints" / "last.ckpt").is_file():
        return str(runs / str(run) / "checkpoints" / "last.ckpt")
    found = sorted((p for p in runs.glob("*/checkpoints/*.ckpt") if (p.name == "last.ckpt") == (name == "last")),
                   key=lambda p: p.stat().st_mtime)
    hint = f"; the newest is {found[-1]}" if found else f"; none found under {runs}"
    if name == "best":
        message = "ckpt_path: 'best' is known only inside the process that ran the fit"
    elif run:
        message = f"ckpt_path: 'last': run {run}'s folder has no last.ckpt"
    else:
        message = ("ckpt_path: 'last': this command starts a new run, whose folder is empty "
                   "(trainer.logger.init_args.id=<run id> resumes a run in its own folder)")
    raise CheckpointError(f"{message}; pass the checkpoint file instead{hint}")


def default_trainer() -> dict:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "promptlit", "save_dir": "outputs", "offline": wandb_offline()},
        },
    }


def _pop(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if arg.startswith(flag + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return None


#: top-level keys of a config saved by fit/validate/test/predict that belong to the subcommand
SUBCOMMAND_KEYS = ("ckpt_path", "weights_only", "verbose", "return_predictions")


def _without_subcommand_keys(args: list[str]) -> tuple[list[str], list[str]]:
    """``args`` with each ``--config`` file that a run saved (it has the subcommand's keys, such as
    ``ckpt_path``, which export's parser has no subcommand to take) replaced by a temporary copy
    without them; and the copies, to delete."""
    import tempfile

    import yaml

    out, temps = [], []
    for arg in args:  # --config=PATH as two arguments
        out += arg.split("=", 1) if arg.startswith("--config=") else [arg]
    for i, arg in enumerate(out[:-1]):
        if arg != "--config" or not Path(out[i + 1]).is_file():
            continue
        try:
            cfg = yaml.safe_load(Path(out[i + 1]).read_text())
        except yaml.YAMLError as err:
            for temp in temps:  # copies of earlier --config files
                os.unlink(temp)
            raise SystemExit(f"error: --config: {out[i + 1]} is not valid YAML ({err})") from None
        if isinstance(cfg, dict) and any(k in cfg for k in SUBCOMMAND_KEYS):
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                yaml.safe_dump({k: v for k, v in cfg.items() if k not in SUBCOMMAND_KEYS}, f, sort_keys=False)
            out[i + 1] = f.name
            temps.append(f.name)
    return out, temps


EXPORT_USAGE = ("usage: train.py export --config <config> --ckpt_path <checkpoint> --out_dir <folder>\n"
                "  write a trained soft prompt, prefix or P-tuning prompt as a PEFT adapter folder "
                "(adapter_config.json, adapter_model.safetensors)")


def export(args: list[str]):
    """Load a checkpoint into the config's method and write it as a PEFT adapter folder."""
    import torch

    from prompt_methods.peft_format import export_adapter

    args = list(args)
    ckpt, out_dir = _pop(args, "--ckpt_path"), _pop(args, "--out_dir")
    if not ckpt or not out_dir:
        raise SystemExit("error: export needs --ckpt_path <checkpoint> and --out_dir <folder>")
    args, temps = _without_subcommand_keys(args)
    try:
        check_checkpoint_file(ckpt)
        cli = _cli([*args, "--trainer.logger", "false"], run=False)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        cli.model.configure_trainable()
        cli.model.on_load_checkpoint(state)
        if cli.model.tune_backbone or state.get("promptlit", {}).get("tune_backbone"):
            raise AdapterError("model.init_args.tune_backbone: this run tuned the backbone as well as the prompt; a PEFT "
                               "prompt adapter holds only the prompt, so it would not reproduce the run")
        cli.model.load_state_dict(state["state_dict"], strict=False)
        path = export_adapter(cli.model, out_dir, template=cli.datamodule.template.source)
    except (CheckpointError, AdapterError, OSError) as err:  # OSError: an --out_dir that cannot be written
        fail(err)
    finally:
        for temp in temps:
            os.unlink(temp)
    print(f"wrote PEFT adapter {path}/adapter_config.json and adapter_model.safetensors")
    return path


def main(args: list[str] | None = None) -> PromptCLI:
    if wandb_offline():
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    given = sys.argv[1:] if args is None else args
    if given[:1] == ["export"]:
        if {"-h", "--help"} & set(given[1:]):
            print(EXPORT_USAGE)
            return None
        return export(given[1:])
    if given[:1] in (["-h"], ["--help"]):
        print(EXPORT_USAGE + "\n")  # export is ours, not a LightningCLI subcommand, so its help does not list it
    return _cli(args)


def _cli(args: list[str] | None, run: bool = True) -> PromptCLI:
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:  # a run left open in this process (a notebook, a failed
        wandb.finish()  # run): WandbLogger would log this run into it
    return PromptCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggedSaveConfig,
        parser_class=OneLineErrorParser,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        trainer_defaults=default_trainer(),
        args=args,
        run=run,
    )


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as err:  # bad input: one line, no traceback
        fail(err)
