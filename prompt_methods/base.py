"""PromptModule: the LightningModule every method shares.

It owns the backbone, freezing, the readout, the shared step, metrics, the optimizer and what a
checkpoint keeps. A method changes only how the backbone is fed, by overriding
:meth:`PromptModule.feed` (and adding its own parameters); the feeding helpers are in
:mod:`prompt_methods.feeding`.
"""

from __future__ import annotations

import os
import re
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from prompt_methods import runtime
from prompt_methods.backbone import BackboneError, load_backbone, load_tokenizer, resolve_kind
from prompt_methods.checkpointing import (backbone_fingerprint, check_compatible, restore_rng, rng_state,
                                         stored_label_words, trim_state)
from prompt_methods.generation import Generator
from prompt_methods.feeding import Feeding
from prompt_methods.optim import adamw_with_schedule, check_trainable, count_params, freeze_except
from prompt_methods.span import SpanHead
from prompt_methods.readout import ClassificationHead, build_readout
from prompt_methods.scoring import WeightedMean, log_epoch_metric
from tasks.metrics import METRICS

#: the longest answer of a module built outside a trainer, with ``max_new_tokens`` unset
ANSWER_TOKENS = 24


class PromptModule(Feeding, L.LightningModule):
    """Base of every method.

    Args:
        backbone: alias (``smollm2-135m``, ``minilm-l6``), local model folder or hub id.
        backbone_kind: ``auto`` or one of causal, mlm, seq2seq, encoder.
        verbalizer: token ids per label per word; linked from ``data.verbalizer`` by the CLI.
        labels: label names in verbalizer order; linked from ``data.labels``.
        metric: the task metric (``tasks.metrics.METRICS``); linked from ``data.metric``. Accuracy is
            always logged; others add ``val/<name>`` and ``test/<name>``.
        readout: ``auto``, ``label_words``, ``head`` or ``generate`` (auto: generate for text answers,
            i.e. an empty verbalizer; label words with an LM head; else a classification head).
        tune_backbone: train the backbone's weights too (prompt-based fine-tuning).
        length_norm: divide multi-token word scores by their token count.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of steps with linear warm-up, followed by linear decay.
        backbone_dtype: ``auto`` keeps a frozen backbone in bf16 when the trainer runs bf16, else fp32;
            or ``float32`` / ``bfloat16``. Method parameters (prompt, prefix, encoder, head) always stay fp32,
            under ``bf16-true`` too.
        attn_implementation: ``auto`` (``grouped`` for decoder-only backbones on CPU, else eager there;
            sdpa on GPU), ``grouped``, ``eager`` or ``sdpa``.
        trust_remote_code: allow model code from the hub; off unless set.
        max_new_tokens: the longest answer generated (or extracted as a span), in tokens, for tasks with
            text answers; unset: the task's ``max_answer_tokens``, which also cuts a generated answer's
            training targets (24 for a module built outside a trainer).
        compile: ``torch.compile`` each transformer layer (regional, dynamic shapes) at setup. Pays off
            on long runs only: the first steps wait for the compile (``benchmarks/step_speed.py --compile``).
        residual_dtype: under autocast (``bf16-mixed``) with a 16-bit backbone, the dtype of the hidden
            states between its layers: ``float32`` (matmuls still in bf16; the adds and norms in fp32, as
            autocast over fp32 weights gives) or ``bfloat16`` (a few percent faster on a CPU, noisier
            prompt gradients: see :meth:`~prompt_methods.feeding.Feeding.stream`).
        share_prompt: on a frozen causal backbone, run prompt vectors placed before the input, and the
            template's leading part that every row starts with, once per batch, in an extra row whose
            keys/values the other rows attend to, where that saves positions
            (:mod:`prompt_methods.prompt_cache`); the same scores. ``false``: every row.
        pack_weights: on a CPU, run the backbone's frozen linear layers on oneDNN's packed copies of
            their weights, sibling projections as one matmul (:func:`~prompt_methods.runtime.pack_linears`):
            the same forward, a train step 7-16% faster on SmolLM2, for up to two extra copies of those
            weights in memory (the second once a backward runs). ``auto``: where the copies fit in a
            quarter of the memory available at setup; ``true``; ``false``: the plain matmuls, no copies.
    """

    #: parameter-name prefixes the method trains (besides the readout head)
    method_params: tuple[str, ...] = ()
    #: whether ``compile: true`` may compile attention too (False for methods feeding a key/value cache)
    compile_attention: bool = True
    #: whether the backbone's RMSNorms run through promptlit's fused norm (:func:`runtime.fuse_norms`)
    fused_norms: bool = True
    #: whether ``pack_weights`` may run frozen linear layers on packed weights (:func:`runtime.pack_linears`)
    packs_weights: bool = True

    def __init__(
        self,
        backbone: str = "smollm2-135m",
        backbone_kind: str = "auto",
        verbalizer: list[list[list[int]]] | None = None,
        labels: list[str] | None = None,
        metric: str = "accuracy",
        readout: str = "auto",
        tune_backbone: bool = False,
        length_norm: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        backbone_dtype: str = "auto",
        attn_implementation: str = "auto",
        trust_remote_code: bool = False,
        max_new_tokens: int | None = None,
        compile: bool = False,
        share_prompt: bool = True,
        residual_dtype: str = "float32",
        pack_weights: bool | str = "auto",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["verbalizer", "labels"])
        for key, value, ok, need in (("lr", lr, lr > 0, "above 0"), ("weight_decay", weight_decay, weight_decay >= 0, "0 or more"),
                                     ("warmup_ratio", warmup_ratio, 0 <= warmup_ratio < 1, "in [0, 1)"),
                                     ("max_new_tokens", max_new_tokens, max_new_tokens is None or max_new_tokens >= 1,
                                      "at least 1")):
            if not ok:
                raise ValueError(f"model.init_args.{key}: {value} must be {need}")
        self.tune_backbone, self.lr, self.weight_decay, self.warmup_ratio = tune_backbone, lr, weight_decay, warmup_ratio
        self.backbone_dtype, self.attn_implementation = backbone_dtype, attn_implementation
        self.residual_dtype, self.fp32_stream = residual_dtype, False
        self.compile_layers, self._compiled, self.share_prompt = compile, 0, share_prompt
        self.pack_weights = pack_weights
        if readout == "auto" and not verbalizer:  # a task with text answers
            readout = "span" if resolve_kind(backbone, backbone_kind, trust_remote_code) in ("encoder", "mlm") else "generate"
        if not verbalizer and readout not in ("generate", "span"):
            raise ValueError("model.init_args.verbalizer is empty: the CLI links it from the data module's label words")
        runtime.check_settings(backbone_dtype, attn_implementation, residual_dtype, pack_weights)  # fail here, not in setup
        self.backbone, self.kind = load_backbone(backbone, backbone_kind, trust_remote_code)
        self.tokenizer = load_tokenizer(backbone, trust_remote_code)
        if len(self.tokenizer) > self.backbone.get_input_embeddings().num_embeddings:
            self.backbone.resize_token_embeddings(len(self.tokenizer))  # a pad token was added
        self.backbone_fingerprint = backbone_fingerprint(self.backbone)  # of the backbone as loaded, before any tuning
        self._rope = runtime.rope_tables(self.backbone)  # kept fp32 through any cast (``_apply``)
        self.verbalizer = verbalizer
        vocab = self.tokenizer.get_vocab()
        info = {"sentinel_id": vocab.get("<extra_id_0>")}
        try:
            if readout == "generate":
                head = self.backbone.get_output_embeddings()
                vocab_size = max(self.backbone.get_input_embeddings().num_embeddings, getattr(head, "out_features", 0))
                self.readout = Generator(self.kind, self.tokenizer.eos_token_id, max_new_tokens or ANSWER_TOKENS,
                                         self.tokenizer, vocab_size)
            elif readout == "span":
                self.readout = SpanHead(self.hidden_size, max_new_tokens or ANSWER_TOKENS)
            else:
                self.readout = build_readout(readout, self.kind, self.backbone, verbalizer, length_norm, info)
        except ValueError as err:
            key = "model.init_args.readout"
            raise BackboneError(str(err) if str(err).startswith(key) else f"{key}: {err}") from None
        self.text_answers = isinstance(self.readout, (Generator, SpanHead))
        self.head_trained = not isinstance(self.readout, (ClassificationHead, SpanHead))  # a new head starts random
        self.num_labels = max(1, len(verbalizer or []))
        if metric not in METRICS:
            raise ValueError(f"model.init_args.metric: '{metric}' is not one of {', '.join(METRICS)}")
        self.metric, self.labels = metric, labels or [str(i) for i in range(self.num_labels)]
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}
        self.metrics = nn.ModuleDict({f"{s}_acc": MulticlassAccuracy(max(2, self.num_labels), average="micro") for s in ("train", "val", "test")})
        # evaluation losses as sums and counts, gathered from every process: the mean over all examples
        # (a synced ``self.log`` would average the processes' means, unequal shares weighted equally)
        # (a NaN loss stays NaN: torchmetrics' MeanMetric drops it by default, and with NaN checks off it
        # ignores the weights)
        self.eval_losses = nn.ModuleDict({s: WeightedMean() for s in ("val", "test")})
        self.val_acc_best, self.val_score_best = MaxMetric(), MaxMetric()
        for best in (self.val_acc_best, self.val_score_best):
            best.persistent(True)  # in checkpoints: a resumed run keeps its best so far
        self.strict_loading = False  # checkpoints of frozen-backbone methods hold only trained weights

    # ------------------------------------------------------------------ params
    def configure_trainable(self) -> None:
        """Freeze the backbone unless it is tuned; the method's modules and a readout head train."""
        keep = set(self.method_params) | {"readout"}
        if self.tune_backbone:
            keep.add("backbone")
        freeze_except(self, keep)
        if isinstance(self.readout, (ClassificationHead, SpanHead)):  # weights that get no gradient would stop
            for p in self.unused_lm_head_params():  # DDP (find_unused_parameters=False) at its second step
                p.requires_grad_(False)
        # a frozen backbone runs in eval mode (no dropout), a tuned one in train mode
        self.backbone.train(self.tune_backbone)

    def unused_lm_head_params(self) -> list[nn.Parameter]:
        """Backbone weights a head on the last hidden states (classification or span) never uses: the
        LM head (unless tied to the input embeddings), an encoder's pooler, and, for seq2seq backbones,
        the decoder."""
        body = self.backbone.get_encoder() if self.kind == "seq2seq" else self.backbone.base_model
        pooler = getattr(body, "pooler", None)
        skipped = {id(p) for p in pooler.parameters()} if isinstance(pooler, nn.Module) else set()
        used = {id(p) for p in body.parameters()} - skipped
        return [p for p in self.backbone.parameters() if id(p) not in used]

    def text_ids(self, text: str, n: int) -> torch.Tensor:
        """(n,) token ids of ``text`` (``model.init_args.init_text``), repeated or cut to n."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"model.init_args.init_text: {text!r} has no tokens to start the prompt from")
        return torch.tensor(ids).repeat(n // len(ids) + 1)[:n]

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.get_text_config().hidden_size

    def forward(self, batch: dict) -> torch.Tensor:
        """Label scores (B, C) for a batch."""
        return self.readout(self.backbone, self.feed(batch))

    # ------------------------------------------------------------------ loop
    def setup(self, stage: str) -> None:
        self._metric_states_out_of_inference()
        self.configure_trainable()
        self._follow_answer_length()
        if stage == "fit":  # whichever optimizer comes (this module's, or LightningCLI's --optimizer)
            check_trainable(self)
        precision = str(getattr(self.trainer, "precision", "32")) if self._trainer is not None else "32"
        dtype = runtime.backbone_dtype(self.backbone_dtype, precision, self.tune_backbone)
        self.cast_backbone(dtype)
        self.choose_residual_stream(dtype, precision)
        device = self.trainer.strategy.root_device.type if self._trainer is not None else self.device.type
        if hasattr(self.backbone, "set_attn_implementation"):
            self.backbone.set_attn_implementation(runtime.attention(self.attn_implementation, device, self.kind))
        if self.compile_layers and not self._compiled:
            self._compiled = runtime.compile_blocks(self.backbone, attention=self.compile_attention)
        if self.fused_norms and not self._compiled:
            self._norms_fused = runtime.fuse_norms(self.backbone) > 0
        if (self.packs_weights and not self._compiled and self._whole_weights()
                and runtime.should_pack(self.pack_weights, self.backbone, device)):
            self._linears_packed = runtime.pack_linears(self.backbone) > 0

    def _metric_states_out_of_inference(self) -> None:
        """Lightning validates, tests and predicts in inference mode, so the metric states an earlier
        run left are inference tensors, which the in-place updates of a fit's validation (under
        ``no_grad``) refuse: each such state becomes a normal copy, with the same values."""
        for metric in self.modules():
            if not isinstance(metric, Metric):
                continue
            for name, value in metric.metric_state.items():
                if isinstance(value, torch.Tensor) and value.is_inference():
                    setattr(metric, name, value.clone())
                elif isinstance(value, list) and any(isinstance(v, torch.Tensor) and v.is_inference() for v in value):
                    setattr(metric, name, [v.clone() if isinstance(v, torch.Tensor) else v for v in value])

    def _whole_weights(self) -> bool:
        """Whether each process holds the backbone's whole weights for the run (one device, or DDP's
        replicas), not shards that a strategy gathers for each forward (FSDP, DeepSpeed), whose
        storage a packed copy could not follow."""
        if self._trainer is None:
            return True
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

        strategy = self.trainer.strategy
        return isinstance(strategy, SingleDeviceStrategy) or (isinstance(strategy, DDPStrategy)
                                                                and not isinstance(strategy, DeepSpeedStrategy))

    def train(self, mode: bool = True):
        """Also keeps the fused norms and packed linear layers: transformers re-kernelizes a model whose
        train mode changes, which gives its hub-kernel layers (RMSNorms among them) their class's forward back."""
        out = super().train(mode)
        if getattr(self, "_norms_fused", False):
            runtime.fuse_norms(self.backbone)
        if getattr(self, "_linears_packed", False):
            runtime.pack_linears(self.backbone)
        return out

    def _follow_answer_length(self, fallback: int | None = None) -> None:
        """Unless ``max_new_tokens`` is set, answers may be as long as the task's training targets: the
        trainer's data module's ``max_answer_tokens``, else ``fallback`` (a checkpoint's)."""
        length = getattr(getattr(self._trainer, "datamodule", None), "max_answer_tokens", None) or fallback
        if self.hparams.max_new_tokens is None and length:
            if isinstance(self.readout, Generator):
                self.readout.max_new_tokens = length
            elif isinstance(self.readout, SpanHead):
                self.readout.max_answer_tokens = length

    @property
    def answer_length(self) -> int | None:
        """The longest answer generated or extracted, in tokens (None for label tasks)."""
        if isinstance(self.readout, Generator):
            return self.readout.max_new_tokens
        return self.readout.max_answer_tokens if isinstance(self.readout, SpanHead) else None

    def cast_backbone(self, dtype: torch.dtype) -> None:
        """Store the backbone's weights in ``dtype``; its rotary frequencies stay fp32."""
        self.backbone.to(dtype)
        runtime.restore_rope(self.backbone, self._rope)

    def _apply(self, fn, *args, **kwargs):
        """``.to(dtype)``, ``.half()`` and Lightning's ``bf16-true``/``16-true`` cast everything: keep
        the rotary frequencies fp32 (:func:`runtime.rope_tables`), and the method's trained parameters
        (prompt, prefix, encoder, head) fp32 too, as PEFT keeps an adapter's, so that AdamW's small
        updates are not rounded away in 16 bits; they are cast where they meet the backbone's activations.
        A tuned backbone's own weights follow the cast."""
        kept = {id(t) for name, p in self.named_parameters()
                if p.requires_grad and p.dtype == torch.float32 and not name.startswith("backbone.")
                for t in (p, p.grad) if t is not None}

        def cast(t):  # a kept tensor moves where ``fn`` sends it but keeps fp32 (each module, e.g. an LSTM
            out = fn(t)  # re-flattening its weights, then sees its final tensors)
            if id(t) in kept and out.dtype in (torch.bfloat16, torch.float16):
                return t.data.to(out.device)
            return out

        out = super()._apply(cast if kept else fn, *args, **kwargs)
        if getattr(self, "_rope", None):
            runtime.restore_rope(self.backbone, self._rope)
        return out

    def choose_residual_stream(self, dtype: torch.dtype, precision: str) -> None:
        """A 16-bit backbone under autocast keeps fp32 hidden states between its layers (``Feeding.stream``)
        and fp32 norms, when ``residual_dtype`` is float32."""
        self.fp32_stream = self.residual_dtype == "float32" and dtype != torch.float32 and precision.endswith("-mixed")
        if self.fp32_stream:
            runtime.norms_to_fp32(self.backbone)

    def _refuse_untrained_head(self) -> None:
        """validate/test/predict with a new, never trained head would report a random model's scores."""
        if self.head_trained:
            return
        raise ValueError(
            f"model.init_args.readout: {type(self).__name__} reads this {self.kind} backbone out through a new "
            f"{type(self.readout).__name__} (the backbone has no LM head to score label words with), and that head is "
            f"untrained: {self.trainer.state.fn.value} needs a fitted run's checkpoint (--ckpt_path), or a backbone with an LM head"
        )

    on_validation_start = on_test_start = on_predict_start = _refuse_untrained_head

    def on_fit_start(self) -> None:
        self.head_trained = True
        self._expect_frozen_backbone_in_eval()
        trainable, total = count_params(self)
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)
            logger.log_hyperparams({"trainable_params": trainable, "total_params": total})
        self.print(f"{type(self).__name__}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.4f}%)")

    def _expect_frozen_backbone_in_eval(self) -> None:
        """Lightning warns about every module in eval mode when training starts. A frozen backbone is
        there on purpose (no dropout), so that warning is silenced for exactly its count of modules;
        any other module left in eval mode changes the count and the warning still shows."""
        if self.tune_backbone:
            return
        in_eval = [name for name, module in self.named_modules() if not module.training]
        if in_eval and all(name == "backbone" or name.startswith("backbone.") for name in in_eval):
            from lightning.pytorch.utilities.warnings import PossibleUserWarning
            warnings.filterwarnings("ignore", category=PossibleUserWarning,
                                    message=re.escape(f"Found {len(in_eval)} module(s) in eval mode at the start of training."))

    def answer_texts(self, batch: dict) -> list[str]:
        """Predicted answer strings: extracted spans or greedy generations."""
        if isinstance(self.readout, SpanHead):
            return self.readout.predict(self.backbone, self.feed(batch), batch)
        ids = self.readout.generate(self.backbone, self.feed(batch))
        # an answer ends at the end token or the first line break, whichever comes first
        return [a.strip().split("\n")[0].strip() for a in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training loss of a batch, and the label scores (B, C) for label tasks (None for text answers)."""
        if isinstance(self.readout, SpanHead):
            loss, scores = self.readout.loss(self.backbone, self.feed(batch), batch), None
        elif self.text_answers:
            loss, scores = self.readout.loss(self.backbone, self.feed(batch), batch["target_ids"], batch["target_mask"]), None
        else:
            scores = self(batch)
            loss = F.cross_entropy(scores.float(), batch["labels"])
        if not torch.isfinite(loss):
            step = self.global_step if self._trainer is not None else "?"
            raise FloatingPointError(f"loss is {loss.item()} at global step {step}")
        return loss, scores

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        loss, scores = self.loss(batch)
        if self.text_answers:
            self._log_loss(split, loss, len(batch["ids"]))
            if split in self._outputs:
                self._outputs[split].append((self.answer_texts(batch), batch["answers"]))
            return loss
        if split in self._outputs and self.metric != "accuracy":
            self._outputs[split].append((scores.argmax(-1).detach(), batch["labels"]))
        metric = self.metrics[f"{split}_acc"]
        metric(scores, batch["labels"])
        bs = len(batch["labels"])
        self._log_loss(split, loss, bs)
        train = split == "train"  # per step in training (one key, train/acc), per evaluation otherwise
        self.log(f"{split}/acc", metric, prog_bar=True, batch_size=bs, on_step=train, on_epoch=not train)
        return loss

    def _log_loss(self, split: str, loss: torch.Tensor, batch_size: int) -> None:
        if split not in self.eval_losses:
            self.log(f"{split}/loss", loss, prog_bar=True, batch_size=batch_size)
            return
        self.eval_losses[split].update(loss.detach(), weight=batch_size)
        self.log(f"{split}/loss", self.eval_losses[split], batch_size=batch_size, on_step=False, on_epoch=True)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        score = self._log_task_metric("val")
        if not self.trainer.sanity_checking:
            if not self.text_answers:
                self.val_acc_best(self.metrics["val_acc"].compute())
                self.log("val/acc_best", self.val_acc_best.compute())
            self.val_score_best(score)
            self.log("val/score_best", self.val_score_best.compute())

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_task_metric("test")

    def _log_task_metric(self, split: str) -> torch.Tensor:
        outputs, self._outputs[split] = self._outputs[split], []
        return log_epoch_metric(self, split, outputs)

    def predict_step(self, batch, batch_idx):
        if self.text_answers:
            return {"id": batch["ids"], "answer": self.answer_texts(batch), "gold": batch.get("answers")}
        probs = self(batch).float().softmax(-1)
        out = {"id": batch["ids"], "pred": probs.argmax(-1).tolist(), "probs": probs.tolist()}
        if "labels" in batch:
            out["label"] = batch["labels"].tolist()
        return out

    # ------------------------------------------------------------------ optim
    def configure_optimizers(self):
        # a fused AdamW unscales 16-bit gradients inside its step, so Lightning's mixed precision cannot
        # clip before it: with gradient clipping the optimizer is the unfused one
        clipping = bool(self.trainer.gradient_clip_val)
        return adamw_with_schedule(self, self.lr, self.weight_decay, self.warmup_ratio, self.trainer.estimated_stepping_batches,
                                   fused=not clipping)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trained weights when the backbone is frozen; record method and backbone fingerprint,
        and the random number generators' state (dropout in a tuned backbone or a head draws from it)."""
        trim_state(self, checkpoint)
        checkpoint["rng"] = rng_state()
        if self.answer_length is not None:  # the task's answer length, for a module loaded without a trainer
            checkpoint["answer_tokens"] = self.answer_length

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, plus the label words and labels the checkpoint was trained with (they come from
        the data module, so they are not among the hyperparameters): a module loaded by hand, without
        a data module, reads answers as the trained one did. Keywords given here still win."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and os.path.isfile(checkpoint_path):
            kwargs = {**stored_label_words(checkpoint_path, weights_only=kwargs.get("weights_only") is not False), **kwargs}
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_compatible(self, checkpoint)
        self.head_trained = True
        self._follow_answer_length(checkpoint.get("answer_tokens"))  # a trainer's data module still wins
        if self._trainer is not None and self.trainer.state.fn == "fit" and "rng" in checkpoint:
            restore_rng(checkpoint["rng"])  # a resumed fit draws the dropout masks an uninterrupted one would
