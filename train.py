"""promptlit entry point: ``python train.py fit|validate|test|predict --config configs/<task>/<method>.yaml``."""

from __future__ import annotations

import os
import re

from lightning.pytorch.cli import LightningCLI

from prompt_methods.callbacks import LoggedSaveConfig


def method_name(class_path: str) -> str:
    """``prompt_methods.SoftPrompt`` -> ``soft_prompt``: the one name a method has everywhere."""
    name = class_path.rsplit(".", 1)[-1]
    return {"PTuning": "p_tuning"}.get(name, re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower())


class PromptCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")
        parser.link_arguments("model.init_args.backbone_kind", "data.init_args.backbone_kind")
        parser.link_arguments("data.verbalizer", "model.init_args.verbalizer", apply_on="instantiate")
        parser.link_arguments("data.labels", "model.init_args.labels", apply_on="instantiate")
        parser.link_arguments("data.metric", "model.init_args.metric", apply_on="instantiate")
        parser.set_defaults({"trainer.callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"monitor": "val/score", "mode": "max", "save_last": True, "save_top_k": 1}},
            {"class_path": "prompt_methods.callbacks.PredictionWriter"},
            {"class_path": "prompt_methods.callbacks.Throughput"},
        ]})

    def before_instantiate_classes(self) -> None:
        """Tag W&B runs with task and method, and name them after both."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
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


def default_trainer() -> dict:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "promptlit", "save_dir": "outputs", "offline": "WANDB_API_KEY" not in os.environ},
        },
    }


def main(args: list[str] | None = None) -> PromptCLI:
    if "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return PromptCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggedSaveConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        trainer_defaults=default_trainer(),
        args=args,
    )


if __name__ == "__main__":
    main()
