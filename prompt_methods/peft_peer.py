"""The Hugging Face PEFT implementation of a prompt method, run inside promptlit's loop.

The benchmark trains it beside the native method on the same backbone, data, template, label
words, steps, batch, optimizer, precision and seed. It does what a PEFT user does: wrap the
backbone with ``peft.get_peft_model`` and call the wrapped model on ``input_ids``; PEFT prepends
its virtual tokens (it has no template slots) and returns logits at every position. The label
words are read at the last position; a multi-token word is scored by running the prompt again
with the word appended, since PEFT has no shared-prompt scoring.

``backbone_dtype`` and ``attn_implementation`` default to what ``from_pretrained`` gives a PEFT
user (fp32 weights under autocast, SDPA attention); set them to compare like for like.
Needs the optional ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prompt_methods.backbone import resolve
from prompt_methods.base import PromptModule
from prompt_methods.readout import CausalLabelWords
from prompt_methods.soft_prompt import vocab_rows

PEER_METHODS = ("soft_prompt", "prefix_tuning", "p_tuning")


def peft_config(method: str, num_virtual_tokens: int, init: str, init_text: str | None, tokenizer_path: str,
                encoder: str, encoder_hidden: int, reparameterize: bool, mlp_hidden: int):
    """The PEFT config equivalent to a promptlit method's settings."""
    try:
        import peft
    except ImportError:
        raise ImportError("model.class_path: PeftPeer needs peft; pip install -e '.[bench]'") from None
    task = peft.TaskType.CAUSAL_LM
    if method == "soft_prompt":
        kinds = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}
        if init not in kinds:
            raise ValueError(f"model.init_args.init: '{init}' is not one of {', '.join(kinds)}")
        extra = {"prompt_tuning_init_text": init_text, "tokenizer_name_or_path": tokenizer_path} if init == "text" else {}
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens,
                                       prompt_tuning_init=getattr(peft.PromptTuningInit, kinds[init]), **extra)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens,
                                       prefix_projection=reparameterize, encoder_hidden_size=mlp_hidden)
    if method == "p_tuning":
        kind = {"lstm": "LSTM", "mlp": "MLP"}.get(encoder)
        if kind is None:
            raise ValueError(f"model.init_args.encoder: '{encoder}' is not lstm or mlp")
        # PEFT's encoder_hidden_size is the width of each LSTM direction (its MLP head is twice as
        # wide); promptlit's encoder_hidden is both directions together: half of it builds the same
        # encoder (2-layer bidirectional LSTM of E/2 per direction, then E -> E -> hidden). PEFT's MLP
        # encoder has one hidden layer more than promptlit's (input -> E -> E -> hidden)
        width = encoder_hidden // 2 if kind == "LSTM" else encoder_hidden
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=num_virtual_tokens,
                                        encoder_reparameterization_type=kind, encoder_hidden_size=width)
    raise ValueError(f"model.init_args.peft_method: '{method}' is not one of {', '.join(PEER_METHODS)}")


class PeftPeer(PromptModule):
    """A prompt method as implemented by PEFT (label-word tasks on causal LMs).

    Args:
        peft_method: ``soft_prompt`` (PromptTuningConfig), ``prefix_tuning`` (PrefixTuningConfig) or
            ``p_tuning`` (PromptEncoderConfig).
        num_virtual_tokens: virtual tokens (prepended by PEFT).
        init: soft prompt init, ``vocab`` / ``random`` / ``text`` (PEFT's SAMPLE_VOCAB / RANDOM / TEXT);
            PEFT's prefix is always random.
        init_text: text for ``init: text``.
        init_seed, init_vocab_ids: as :class:`~prompt_methods.SoftPrompt`'s, for ``same_init``.
        same_init: with ``init: vocab``, start PEFT's soft prompt from the very prompt promptlit's
            ``SoftPrompt`` draws for the same seed (the same vocabulary rows), so that the two runs
            differ in implementation only; ``false`` keeps PEFT's own SAMPLE_VOCAB draw (another
            sample from the same distribution). A 100-step run's outcome can hang on the draw.
        encoder, encoder_hidden: P-tuning encoder (PEFT's LSTM or MLP reparameterization).
        reparameterize, mlp_hidden: prefix tuning's MLP (PEFT's ``prefix_projection``).
        **kwargs: the rest of :class:`PromptModule`.
    """

    method_params = ("peft_model",)
    fused_norms = packs_weights = False  # the backbone as PEFT runs it

    def __init__(self, peft_method: str = "soft_prompt", num_virtual_tokens: int = 20, init: str = "vocab",
                 init_text: str | None = None, init_seed: int | None = None, init_vocab_ids: int | None = None,
                 same_init: bool = True, encoder: str = "lstm", encoder_hidden: int = 256,
                 reparameterize: bool = False, mlp_hidden: int = 512, backbone_dtype: str = "float32",
                 attn_implementation: str = "sdpa", **kwargs):
        super().__init__(backbone_dtype=backbone_dtype, attn_implementation=attn_implementation, **kwargs)
        if self.kind != "causal" or not isinstance(self.readout, CausalLabelWords):
            raise ValueError("model.class_path: PeftPeer covers label-word tasks on causal LMs only")
        if self.tune_backbone:
            raise ValueError("model.init_args.tune_backbone: PeftPeer trains the prompt only")
        cfg = peft_config(peft_method, num_virtual_tokens, init, init_text, resolve(self.hparams.backbone),
                          encoder, encoder_hidden, reparameterize, mlp_hidden)
        import peft

        self.peft_model = peft.get_peft_model(self.backbone, cfg)
        if peft_method == "soft_prompt" and init == "vocab" and same_init:
            table = self.backbone.get_input_embeddings().weight.detach().float()
            weight = self.peft_model.prompt_encoder["default"].embedding.weight
            with torch.no_grad():
                weight.copy_(vocab_rows(table, num_virtual_tokens, init_seed, init_vocab_ids))

    def feed(self, batch):  # PEFT feeds the backbone itself; a template slot has nowhere to go
        raise NotImplementedError

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.peft_model(input_ids=ids, attention_mask=mask).logits

    def forward(self, batch: dict) -> torch.Tensor:
        if (batch["soft_index"] >= 0).any():
            raise ValueError("data.init_args.template: PEFT prepends its virtual tokens; use a template without {soft:N}")
        ids, mask, words = batch["input_ids"], batch["attention_mask"], self.readout
        logp = F.log_softmax(self._logits(ids, mask)[:, -1].float(), dim=-1)  # left padding: the answer is last
        scores = logp[:, words.words[:, 0]]  # (B, W)
        if words.multi_token:
            rest = []
            for w in range(words.words.size(0)):
                n = int(words.lengths[w])
                if n == 1:
                    rest.append(scores.new_zeros(ids.size(0)))
                    continue
                word = words.words[w, :n].expand(ids.size(0), -1)
                logits = self._logits(torch.cat([ids, word[:, :-1]], 1), torch.cat([mask, mask.new_ones(ids.size(0), n - 1)], 1))
                lp = F.log_softmax(logits[:, -(n - 1):].float(), dim=-1)
                rest.append(lp.gather(-1, word[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1))
            scores = scores + torch.stack(rest, 1)
        return words.aggregate(scores)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the prompt only: PEFT's wrapper holds the backbone (and its word embeddings) a second time."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("peft_model.") or k.startswith("peft_model.prompt_encoder.")}
