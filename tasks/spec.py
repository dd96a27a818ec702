"""Tasks as data: fields, label set, label words, template, metric and where the splits live.

Built-in tasks are the YAML files beside this module (``tasks/<name>.yaml``); a config may also
name any YAML file of the same shape. A DataModule turns a spec plus its overrides into batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tasks.template import Template

TASK_DIR = Path(__file__).parent
#: how a cap on evaluation examples picks them (``TaskSpec.eval_sample``)
EVAL_SAMPLES = ("random", "first")


class TaskError(ValueError):
    """A task spec that is missing or inconsistent."""


@dataclass
class SplitSource:
    """Where one split comes from.

    Args:
        file: path, relative to the DataModule's ``data_dir`` unless absolute.
        format: csv, tsv, json, jsonl, parquet, or a custom reader name from ``datamodules.readers.READERS``;
            inferred from the extension when empty.
        columns: column names for files without a header row.
        rename: file column -> task field (column mapping).
        label_map: raw label value -> label name.
        hub: a ``datasets`` hub name instead of a file (``name`` or ``name:config``), with ``split`` below.
        split: the hub split.
        shards: for readers of grouped data (SQuAD articles): keep groups whose index modulo 10 is listed,
            so splits never share a group.
    """

    file: str = ""
    format: str = ""
    columns: list[str] | None = None
    rename: dict[str, str] = field(default_factory=dict)
    label_map: dict[str, str] = field(default_factory=dict)
    hub: str = ""
    split: str = ""
    shards: list[int] | None = None


@dataclass
class TaskSpec:
    """One task. ``label_words`` maps each label to one or more words; words may be multi-token.

    ``eval_sample`` is how a cap on validation/test examples picks them: ``random`` (the default: a
    fixed draw with the DataModule's ``split_seed``, the same for every run) or ``first`` (file order;
    fair only for a file in no particular order; a SQuAD file is grouped by article, FewRel's by relation).

    ``answer_type`` is ``label`` (a verbalizer scores label words) or ``text`` (the answer is generated,
    or extracted as a span; rows carry ``answers``, a list of gold strings).
    ``validation_size`` / ``test_size`` hold rows out of train (with the DataModule's ``split_seed``)
    when the task has no such split. ``label_words_file`` (relative to ``data_dir``) is a JSON object
    label -> name or [name, ...], read when ``label_words`` is empty (FewRel's ``pid2name.json``).
    """

    name: str
    family: str
    fields: list[str]
    template: str
    labels: list[str] = field(default_factory=list)
    label_words: dict[str, list[str]] = field(default_factory=dict)
    metric: str = "accuracy"
    answer_type: str = "label"
    max_answer_tokens: int = 24
    span_field: str = "context"
    splits: dict[str, SplitSource] = field(default_factory=dict)
    validation_size: int = 0
    test_size: int = 0
    label_words_file: str = ""
    eval_sample: str = "random"
    description: str = ""

    @classmethod
    def from_dict(cls, raw: dict, origin: str) -> "TaskSpec":
        raw = dict(raw)
        try:
            raw["splits"] = {k: SplitSource(**v) for k, v in (raw.get("splits") or {}).items()}
            raw["label_words"] = {str(k): [v] if isinstance(v, str) else list(v) for k, v in (raw.get("label_words") or {}).items()}
            raw["labels"] = [str(x) for x in raw.get("labels") or []]
            spec = cls(**raw)
        except TypeError as err:
            raise TaskError(f"{origin}: {err}") from None
        if spec.eval_sample not in EVAL_SAMPLES:
            raise TaskError(f"{origin}: eval_sample must be one of {', '.join(EVAL_SAMPLES)}, not {spec.eval_sample!r}")
        spec.parsed_template(key=f"{origin}: template")
        return spec

    def parsed_template(self, template: str | None = None, key: str = "data.init_args.template") -> Template:
        return Template.parse(template or self.template, self.fields, key=key)


def load_task(name_or_path: str) -> TaskSpec:
    """Load a built-in task by name or a task YAML by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASK_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TASK_DIR.glob("*.yaml")))
        raise TaskError(f"data.init_args.task: '{name_or_path}' is neither a built-in task ({known}) nor a YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: not a valid YAML task file ({err})") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task file must be a YAML mapping")
    return TaskSpec.from_dict(raw, str(path))
