"""The DataModule shared by all task families: read splits, hold out validation, sample few-shot,
tokenize once in ``setup`` and pad dynamically per batch."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.collate import pad_batch
from datamodules.encoding import (Encoded, TemplateTokenizer, answer_span, answer_start, generation_target,
                                  tokenize_label_words)
from datamodules.readers import READERS, DataError, read_label_words, read_split
from datamodules.sampling import BucketSampler, EvalSampler, ResumableLoader, by_length
from prompt_methods.backbone import load_tokenizer, resolve_kind
from tasks.spec import EVAL_SAMPLES, SplitSource, TaskSpec, load_task

#: ``shared/data`` beside the repository (not the working directory), unless ``PROMPTLIT_DATA`` says otherwise
DEFAULT_DATA_DIR = os.environ.get("PROMPTLIT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
SPLITS = ("train", "validation", "test", "predict")
#: the splits each Lightning stage reads
STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("predict",)}


class PromptDataModule(L.LightningDataModule):
    """Reads a task's splits and turns them into prompt batches for any method.

    Args:
        task: built-in task name (``tasks/<name>.yaml``) or a task YAML path.
        backbone: backbone alias, folder or hub id; linked from ``model.init_args.backbone``.
        backbone_kind: ``auto`` or causal/mlm/seq2seq/encoder; linked from the model.
        trust_remote_code: run the backbone repository's own tokenizer/config code; linked from the model.
        data_dir: folder that relative split files are read from.
        template: overrides the task's template.
        label_words: overrides the task's label words (label -> word or list of words).
        train_file: overrides the train split file (any csv/tsv/json/jsonl/parquet).
        validation_file: overrides the validation split file; without one, validation is held out of train.
        test_file: overrides the test split file.
        predict_file: file to run ``predict`` on; defaults to the test split.
        rename: column mapping for the override files (file column -> task field or ``label``).
        format: reader of the override files: csv, tsv, tsv_quoted (quoted fields), json, jsonl, parquet, or one of the built-in
            tasks' readers (squad, boolq, semeval, fewrel, trec) for files in those datasets' own
            shapes; default: from each file's extension.
        max_length: the most tokens in one prompt; only input fields are truncated.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        few_shot_k: sample K training (and K validation) examples per class.
        max_train_samples: cap on training examples after few-shot sampling.
        max_eval_samples: cap on validation and test examples (``predict`` still writes every test example).
        max_val_samples: cap on validation examples alone (default: ``max_eval_samples``). Use it, not
            the trainer's ``limit_val_batches``, to validate on part of a split: evaluation runs longest
            first, so the first batches hold the longest examples.
        eval_sample: how a cap picks its examples: ``random`` (drawn with ``split_seed``, the same for
            every run) or ``first`` (file order); defaults to the task's ``eval_sample``.
        validation_size: examples held out of train for validation when the task has no dev set;
            defaults to the task's ``validation_size``.
        split_seed: seed of the held-out validation split, fixed so all runs share one validation set.
        seed: seed for few-shot sampling and shuffling.
        bucket_by_length: draw training batches of similar length (shuffled pools of 50 batches, each
            sorted by length) and evaluate longest first; less padding, same metrics. ``predict``
            keeps the file order.
        num_workers: DataLoader workers.
    """

    #: the task family this DataModule reads; a task spec of another family is an error
    family: str = "classification"

    def __init__(
        self,
        task: str = "sst2",
        backbone: str = "smollm2-135m",
        backbone_kind: str = "auto",
        trust_remote_code: bool = False,
        data_dir: str = DEFAULT_DATA_DIR,
        template: str | None = None,
        label_words: dict[str, str | list[str]] | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        rename: dict[str, str] | None = None,
        format: str | None = None,
        max_length: int = 256,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        few_shot_k: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        max_val_samples: int | None = None,
        eval_sample: str | None = None,
        validation_size: int | None = None,
        split_seed: int = 1234,
        seed: int = 42,
        bucket_by_length: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        for key, value in (("max_length", max_length), ("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                           ("few_shot_k", few_shot_k), ("max_train_samples", max_train_samples),
                           ("max_eval_samples", max_eval_samples), ("max_val_samples", max_val_samples)):
            if value is not None and (isinstance(value, bool) or value < 1):
                off = " (null for no cap)" if key.startswith(("max_", "few_")) and key != "max_length" else ""
                raise DataError(f"data.init_args.{key}: {value} must be a positive integer{off}")
        if num_workers < 0:
            raise DataError(f"data.init_args.num_workers: {num_workers} must be 0 or more")
        self.spec: TaskSpec = load_task(task)
        if self.spec.family != self.family:
            raise DataError(
                f"data.init_args.task: '{self.spec.name}' is a {self.spec.family} task; "
                f"{type(self).__name__} reads {self.family} tasks"
            )
        if eval_sample is not None and eval_sample not in EVAL_SAMPLES:
            raise DataError(f"data.init_args.eval_sample: {eval_sample!r} is not one of {', '.join(EVAL_SAMPLES)}")
        self.eval_sample = eval_sample or self.spec.eval_sample
        if format is not None and format not in READERS:
            raise DataError(f"data.init_args.format: {format!r} is not one of {', '.join(READERS)}")
        for key, path in (("train", train_file), ("validation", validation_file), ("test", test_file), ("predict", predict_file)):
            if path:
                self.spec.splits[key] = SplitSource(file=path, rename=rename or {}, format=format or "")
        if label_words:
            self.spec.label_words = {str(k): [v] if isinstance(v, str) else list(v) for k, v in label_words.items()}
        self.template = self.spec.parsed_template(template).require_mask()
        if not self.template.fields:
            raise DataError(f"data.init_args.template: {self.template.source!r} uses none of the task's fields "
                            f"({', '.join('{' + f + '}' for f in self.spec.fields)}): every example would read the same")
        self.text_answers = self.spec.answer_type == "text"
        if not self.spec.label_words and self.spec.label_words_file:
            self.spec.label_words = read_label_words(Path(data_dir) / self.spec.label_words_file)
        self.labels = self.spec.labels or sorted(self.spec.label_words)
        missing = [lab for lab in self.labels if not self.spec.label_words.get(lab)]
        if not self.labels and not self.text_answers:
            raise DataError(f"data.init_args.task: '{self.spec.name}' has neither labels nor answer_type: text")
        if missing:
            raise DataError(f"data.init_args.label_words: no words for label(s) {missing}")
        self.tokenizer = load_tokenizer(backbone, trust_remote_code)
        self.kind = resolve_kind(backbone, backbone_kind, trust_remote_code)
        self.verbalizer = tokenize_label_words(self.tokenizer, self.template, self.labels, self.spec.label_words, self.kind)
        mask_tokens = max((len(w) for words in self.verbalizer for w in words), default=1)
        self.encoder = TemplateTokenizer(self.tokenizer, self.template, self.kind, max_length, mask_tokens)
        self.rows_moved = 0  # rows whose text starts later to keep what truncation would cut (``must_keep``)
        self.datasets: dict[str, list[dict]] = {}

    @property
    def metric(self) -> str:
        return self.spec.metric

    @property
    def max_answer_tokens(self) -> int:
        return self.spec.max_answer_tokens

    # ------------------------------------------------------------------ labels
    def _source_of(self, split: str) -> str:
        """The file (or hub dataset) a split's rows come from: predict defaults to test, held-out
        splits come from train."""
        src = (self.spec.splits.get(split) or (self.spec.splits.get("test") if split == "predict" else None)
               or self.spec.splits.get("train"))
        return (src.file or src.hub) if src else "?"

    def label_index(self, row: dict, origin: str) -> int:
        label = str(row["label"])
        try:
            return self.labels.index(label)
        except ValueError:
            raise DataError(
                f"{origin} ({row.get('id')}): label {label!r} is not in data.init_args.label_words "
                f"(known: {', '.join(self.labels)})"
            ) from None

    # ------------------------------------------------------------------ splits
    def required_columns(self, split: str) -> list[str]:
        """Columns every row of a split must have (after renaming)."""
        answer = "answers" if self.text_answers else "label"
        return list(self.template.fields) + ([answer] if split != "predict" else [])

    def prepare_row(self, row: dict) -> dict:
        """Family-specific derived fields (e.g. entity mentions); identity here."""
        return row

    def _read(self, split: str) -> list[dict]:
        rows = read_split(self.spec.splits[split], self.hparams.data_dir, split, self.required_columns(split))
        return [self.prepare_row(r) for r in rows]

    def _per_class(self, rows: list[dict], k: int, rng: random.Random, split: str) -> list[dict]:
        by_label = defaultdict(list)
        for row in rows:
            self.label_index(row, f"{split} split of {self._source_of(split)}")  # an unknown label is an error, not skipped
            by_label[str(row["label"])].append(row)
        picked = []
        for label in self.labels:
            pool = by_label.get(label, [])
            picked += rng.sample(pool, min(k, len(pool)))
        rng.shuffle(picked)
        return picked

    def _hold_out(self, rows: list[dict], size: int, key: str, salt: int) -> tuple[list[dict], list[dict]]:
        """Split ``size`` rows off ``rows`` with ``split_seed`` (independent of the run seed)."""
        if size <= 0 or size >= len(rows):
            raise DataError(f"{key}={size} does not fit a train split of {len(rows)} rows")
        order = list(range(len(rows)))
        random.Random(self.hparams.split_seed + salt).shuffle(order)
        held = set(order[:size])
        return [r for i, r in enumerate(rows) if i in held], [r for i, r in enumerate(rows) if i not in held]

    def _eval_subset(self, rows: list[dict], cap: int, salt: int) -> list[dict]:
        """``cap`` of ``rows`` by ``eval_sample``: the first, or a draw with ``split_seed`` (independent of
        the run seed, so every run scores the same examples), kept in file order."""
        if self.eval_sample == "first":
            return rows[:cap]
        keep = sorted(random.Random(self.hparams.split_seed + salt).sample(range(len(rows)), cap))
        return [rows[i] for i in keep]

    def _files_needed(self, wanted: set[str]) -> set[str]:
        """The splits to read for ``wanted``: a split held out of train needs train; the predict split
        defaults to test; few-shot sampling draws train and validation from one generator, so either
        needs both (the same examples whichever stage comes first)."""
        own = {name for name in SPLITS if name in self.spec.splits}
        need = set(wanted)
        if "predict" in need and "predict" not in own:
            need.add("test")
        if self.hparams.few_shot_k and not self.text_answers and need & {"train", "validation"}:
            need |= {"train", "validation"}
        held_out = {"validation"} - own | ({"test"} - own if self.spec.test_size else set())
        if need & held_out:
            need.add("train")
        return need & own

    def load_rows(self, wanted: Iterable[str] = SPLITS) -> dict[str, list[dict]]:
        """The ``wanted`` splits (and those they are drawn with) as row dicts, after held-out
        validation and few-shot sampling. Only the files they need are read."""
        hp = self.hparams
        splits = {name: self._read(name) for name in SPLITS if name in self._files_needed(set(wanted))}
        if "train" in splits:
            if "test" not in self.spec.splits and self.spec.test_size:
                splits["test"], splits["train"] = self._hold_out(splits["train"], self.spec.test_size,
                                                                   f"task {self.spec.name}'s test_size", 0)
            if "validation" not in self.spec.splits:
                size = hp.validation_size if hp.validation_size is not None else self.spec.validation_size
                splits["validation"], splits["train"] = self._hold_out(splits["train"], size, "data.init_args.validation_size", 1)
        rng = random.Random(hp.seed)
        if hp.few_shot_k and self.text_answers and "train" in splits:  # no classes: K examples in all
            splits["train"] = rng.sample(splits["train"], min(hp.few_shot_k, len(splits["train"])))
        elif hp.few_shot_k and "train" in splits:
            splits["train"] = self._per_class(splits["train"], hp.few_shot_k, rng, "train")
            splits["validation"] = self._per_class(splits["validation"], hp.few_shot_k, rng, "validation")
        if hp.max_train_samples and "train" in splits:
            splits["train"] = rng.sample(splits["train"], min(hp.max_train_samples, len(splits["train"])))
        if "test" in splits:  # predict writes the whole test split: the caps are for scoring
            splits.setdefault("predict", splits["test"])
        for name, salt in (("validation", 2), ("test", 3)):
            cap = (hp.max_val_samples if name == "validation" else None) or hp.max_eval_samples
            if cap and name in splits and len(splits[name]) > cap:
                splits[name] = self._eval_subset(splits[name], cap, salt)
        return splits

    def encode_row(self, row: dict, split: str) -> dict:
        """Tokenize one row into an item: prompt ids, ``{soft}`` slot indices, the answer position, and
        its answer: a label index, target ids to generate, or a token span (encoder backbones)."""
        span_field = self.spec.span_field if self.text_answers and self.extractive else None
        enc = self.encoder.encode(row, offsets_field=span_field)
        keep = self.must_keep(row, split) if len(enc.input_ids) >= self.encoder.max_length else None
        if keep:
            row, enc = self._keep(row, enc, *keep, span_field)
        item = {"id": str(row["id"]), "input_ids": enc.input_ids, "soft_index": enc.soft_index, "answer_pos": enc.answer_pos}
        if self.text_answers and split != "predict" and not row.get("answers"):
            raise DataError(f"{split} split of {self._source_of(split)} ({row['id']}): 'answers' is empty; unanswerable "
                            "questions (SQuAD 2.0 style) are not supported: drop those rows")
        if span_field:
            item.update(answer_span(enc, row, span_field))
        elif self.text_answers and row.get("answers"):
            item["answers"] = [str(a) for a in row["answers"]]
            space = TemplateTokenizer.mask_space(self.template) if self.kind == "causal" else ""
            item["target_ids"] = generation_target(self.tokenizer, item["answers"][0], space, self.spec.max_answer_tokens,
                                                   self.kind)
        elif not self.text_answers and (split != "predict" or "label" in row):
            item["label"] = self.label_index(row, f"{split} split of {self._source_of(split)}")
        return item

    #: what :meth:`must_keep` keeps, in the message that counts the rows it moved
    kept_what = "the answer"

    def must_keep(self, row: dict, split: str) -> tuple[str, int, int] | None:
        """What truncation must not cut from ``row``: (field, start, end) of the characters that must stay
        in the prompt, or None. Here: a training question's first gold answer in
        its context (SQuAD at max_length 384: 7 of 6,637); evaluation rows are cut as they are, since
        moving their context would need the gold answer."""
        if split != "train" or not self.text_answers or not row.get("answers"):
            return None
        field = self.spec.span_field
        first = answer_start(row, field)
        return None if first < 0 else (field, first, first + len(str(row["answers"][0])))

    def _reach(self, row: dict, field: str) -> tuple[Encoded, int]:
        """The row encoded with ``field``'s offsets, and how far into ``field`` its kept tokens reach."""
        enc = self.encoder.encode(row, offsets_field=field)
        return enc, max((b for _, b in enc.offsets.values()), default=0)

    def _keep(self, row: dict, enc: Encoded, field: str, start: int, end: int,
              offsets_field: str | None) -> tuple[dict, Encoded]:
        """``row`` with ``field`` starting later (at a word, not after ``start``), as little as keeps
        characters ``start..end`` in the prompt, where ``max_length`` would cut them (right truncation
        keeps a field's beginning); ``enc`` re-encoded. Unchanged where nothing is lost, where that part
        alone is longer than the budget, or for a tokenizer without offsets."""
        if not getattr(self.tokenizer, "is_fast", False):  # no character offsets to find the kept part with
            return row, enc
        try:
            _, kept = self._reach(row, field)
        except (NotImplementedError, ValueError, TypeError, KeyError):
            return row, enc
        if kept >= end:
            return row, enc
        text = str(row[field])
        cuts = [0] + [i for i in range(1, start + 1) if text[i - 1].isspace() and not text[i].isspace()]
        lo, hi, best = 0, len(cuts) - 1, None
        while lo <= hi:  # the smallest cut that keeps it
            mid = (lo + hi) // 2
            cut = cuts[mid]
            moved = {**row, field: text[cut:]}
            if row.get("answer_starts") and field == self.spec.span_field:
                moved["answer_starts"] = [s - cut if s is not None and s >= cut else -1 for s in row["answer_starts"]]
            trial, reach = self._reach(moved, field)
            if reach + cut >= end:
                best, hi = (moved, trial), mid - 1
            else:
                lo = mid + 1
        if best is None:
            return row, enc
        self.rows_moved += 1
        moved, trial = best
        return moved, (trial if offsets_field == field else self.encoder.encode(moved, offsets_field=offsets_field))

    @property
    def extractive(self) -> bool:
        """Text answers are extracted as spans by encoder backbones, generated by the others."""
        return self.kind in ("encoder", "mlm")

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the splits ``stage`` uses (all of them without a stage), once each: a
        zero-shot test does not tokenize the train split, and predict needs no train file."""
        self.load_splits(STAGE_SPLITS.get(stage, SPLITS))

    def load_splits(self, wanted: Iterable[str]) -> None:
        missing = [name for name in wanted if name not in self.datasets]
        if not missing:
            return
        for split, rows in self.load_rows(missing).items():
            if split in missing:
                before = self.rows_moved
                self.datasets[split] = [self.encode_row(r, split) for r in rows]
                if self.rows_moved > before:
                    rank_zero_info(f"data: in {self.rows_moved - before} of {len(rows)} {split} examples "
                                   f"data.init_args.max_length={self.encoder.max_length} would cut off {self.kept_what}; "
                                   "their text starts later, so that it stays")

    # ------------------------------------------------------------------ batches
    def collate(self, items: list[dict]) -> dict:
        """Pad a list of encoded items into a batch (:func:`datamodules.collate.pad_batch`)."""
        return pad_batch(items, self.tokenizer.pad_token_id, left=self.kind == "causal")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.load_splits([split])
        hp = self.hparams
        size = hp.batch_size if split == "train" else hp.eval_batch_size
        data = self.datasets[split]
        # every loader has its own generator: starting an iteration draws a seed from the loader's
        # generator, or else from the global one that dropout uses, which a resumed fit (that starts
        # other iterations before its first step) would then not reproduce
        rng = torch.Generator().manual_seed(hp.seed)
        kwargs = {"shuffle": shuffle, "generator": rng}
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if hp.bucket_by_length and split != "predict":
            lengths = [len(it["input_ids"]) for it in data]
            if shuffle:
                sampler = BucketSampler(lengths, size, hp.seed, num_replicas=world, rank=rank)
                return ResumableLoader(data, batch_size=size, sampler=sampler, collate_fn=self.collate,
                                       num_workers=hp.num_workers, batches_done=self._batches_done, generator=rng)
            order = by_length(lengths)
            kwargs = {"sampler": EvalSampler(order, world, rank) if self._shard_eval(split) else order, "generator": rng}
        elif not shuffle and self._shard_eval(split):  # file order, sharded without repeats
            kwargs = {"sampler": EvalSampler(list(range(len(data))), world, rank), "generator": rng}
        return DataLoader(data, batch_size=size, collate_fn=self.collate, num_workers=hp.num_workers, **kwargs)

    def _shard_eval(self, split: str) -> bool:
        """Whether ``split`` is evaluated by :class:`EvalSampler` shares (no example twice) rather than
        Lightning's distributed sampler, which pads every process to an equal share with repeats. Only
        under plain DDP: its evaluation forwards need no collective, so processes may run a batch more
        or less; FSDP and DeepSpeed gather weights in every forward and need equal batch counts, and a
        fractional ``limit_*_batches`` of unequal shares would fail on one process only."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

        trainer = getattr(self, "trainer", None)
        if split == "predict" or trainer is None or trainer.world_size == 1:
            return False
        limit = {"validation": trainer.limit_val_batches, "test": trainer.limit_test_batches}.get(split, 1.0)
        fractional = isinstance(limit, float) and limit < 1.0
        strategy = trainer.strategy
        return isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy) and not fractional

    def _batches_done(self) -> int:
        """Training batches of the current epoch already run (what a mid-epoch checkpoint skips on resume)."""
        trainer = getattr(self, "trainer", None)
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("validation", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        return self._loader("predict", shuffle=False)
