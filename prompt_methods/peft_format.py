"""Hugging Face PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT stores a prompt-learning adapter as one tensor, ``prompt_embeddings``: the virtual-token
vectors after any encoder has run (its "inference mode"). So

* a soft prompt exports its (N, H) vectors as they are (``PROMPT_TUNING``);
* a prefix exports its (N, 2 * layers * kv_heads * head_dim) keys and values (``PREFIX_TUNING``),
  whose layout (layer, key/value, head, dim) is the one PEFT reads;
* P-tuning runs its prompt encoder once and exports the (N, H) outputs (``P_TUNING``).

PEFT prepends its virtual tokens, so a prompt trained in template ``{soft}`` slots cannot be
exported: it would not behave the same. Import reads such a folder into a soft prompt (prompt
tuning and P-tuning adapters; a P-tuning adapter is its collapsed vectors) or a prefix; no peft
install is needed for either direction.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prompt_methods.callbacks import atomic_write_text, umask_mode

#: the two files of a PEFT adapter folder
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

PEFT_TYPE_OF = {"SoftPrompt": "PROMPT_TUNING", "PTuning": "P_TUNING", "PrefixTuning": "PREFIX_TUNING"}


class AdapterError(ValueError):
    pass


def _text_config(backbone):
    return backbone.config.get_text_config()


def adapter_config(module) -> dict:
    """The ``adapter_config.json`` PEFT writes for this method on this backbone."""
    name = type(module).__name__
    if name not in PEFT_TYPE_OF:
        raise AdapterError(f"model.class_path: {name} has no PEFT equivalent; export covers {', '.join(PEFT_TYPE_OF)}")
    cfg = _text_config(module.backbone)
    n_virtual = int(prompt_embeddings(module).size(0))
    out = {
        "peft_type": PEFT_TYPE_OF[name],
        "task_type": {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}.get(module.kind, "FEATURE_EXTRACTION"),
        "num_virtual_tokens": n_virtual,
        "token_dim": cfg.hidden_size,
        # the encoder's input only: promptlit prompts an encoder-decoder's encoder, and PEFT, told 1 (its
        # default for seq2seq is 2: a second set of virtual tokens before the decoder's input), does the same
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_hidden_layers,
        "base_model_name_or_path": module.hparams.get("backbone"),
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    if name == "SoftPrompt":
        out.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None, tokenizer_kwargs=None)
    elif name == "PTuning":
        encoder = module.prompt_encoder
        out.update(encoder_reparameterization_type="LSTM" if encoder.lstm is not None else "MLP",
                   encoder_hidden_size=encoder.mlp[0].out_features, encoder_num_layers=2, encoder_dropout=0.0)
    else:  # prefix: PEFT sizes the prefix by the key/value heads (grouped-query attention)
        out.update(token_dim=module.n_kv * module.head_dim, num_attention_heads=module.n_kv,
                   prefix_projection=False, encoder_hidden_size=cfg.hidden_size, init_weights=None)
    return out


@torch.no_grad()
def prompt_embeddings(module) -> torch.Tensor:
    """The (N, D) tensor PEFT stores: the prompt vectors after any encoder, in fp32 on the CPU."""
    name = type(module).__name__
    if name == "SoftPrompt":
        vectors = module.prompt
    elif name == "PTuning":
        vectors = module.prompt_encoder()
    elif name == "PrefixTuning":
        vectors = module.prefix_kv()
    else:
        raise AdapterError(f"model.class_path: {name} has no PEFT equivalent; export covers {', '.join(PEFT_TYPE_OF)}")
    return vectors.detach().float().cpu().contiguous()


def export_adapter(module, out_dir: str | Path, template: str | None = None) -> Path:
    """Write ``module``'s prompt as a PEFT adapter folder; ``template`` is the data template it was trained with."""
    if template and "{soft" in template and type(module).__name__ != "PrefixTuning":
        raise AdapterError(
            f"data.init_args.template: '{template}' puts the prompt in {{soft}} slots, but PEFT prepends its virtual "
            "tokens, so the exported adapter would not give the same outputs; train with a template without {soft:N}"
        )
    from prompt_methods.readout import ClassificationHead
    from prompt_methods.span import SpanHead

    config = json.dumps(adapter_config(module), indent=2, sort_keys=True)  # refuses a method PEFT has no name for
    if getattr(module, "tune_backbone", False):
        raise AdapterError("model.init_args.tune_backbone: this run tuned the backbone as well as the prompt; a PEFT "
                           "prompt adapter holds only the prompt, so it would not reproduce the run")
    if isinstance(getattr(module, "readout", None), (ClassificationHead, SpanHead)):
        raise AdapterError(
            f"model.init_args.readout: this run trained a new {type(module.readout).__name__} on top of the backbone as well "
            "as the prompt; a PEFT prompt adapter holds only the prompt, so it would not reproduce the run"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"--out_dir: {out} is a file, not a folder")
    tensors = {"prompt_embeddings": prompt_embeddings(module)}
    out.parent.mkdir(parents=True, exist_ok=True)
    # both files are written in full into a staging folder first; a new folder then appears whole (one
    # rename), and in an existing one each file is replaced whole, the weights an instant before the config
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        stage.chmod(umask_mode(0o777))  # mkdtemp's folder is private; the adapter is to be shared
        save_file(tensors, str(stage / WEIGHTS), metadata={"format": "pt"})
        (stage / WEIGHTS).chmod(umask_mode())  # safetensors writes it private
        atomic_write_text(stage / CONFIG, config)
        with open(stage / WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        try:
            stage.rename(out)  # out does not exist yet (or is an empty folder)
            return out
        except OSError:
            pass
        for name in (WEIGHTS, CONFIG):
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def read_adapter(path: str | Path, key: str = "model.init_args.adapter") -> tuple[dict, torch.Tensor]:
    """(adapter_config, prompt_embeddings) of a PEFT prompt-learning adapter folder; errors name ``key``."""
    folder = Path(path)
    cfg_file, weights = folder / CONFIG, folder / WEIGHTS
    if not cfg_file.is_file():
        raise AdapterError(f"{key}: {cfg_file} not found (a PEFT adapter folder holds adapter_config.json)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{key}: {cfg_file} is not valid JSON ({err})") from None
    if not weights.is_file():
        bin_file = folder / "adapter_model.bin"
        hint = " (only the pickled adapter_model.bin is there, which is not loaded for safety)" if bin_file.exists() else ""
        raise AdapterError(f"{key}: {weights} not found{hint}")
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types
        raise AdapterError(f"{key}: {weights} is not a readable safetensors file ({err})") from None
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"{key}: {weights} has no 'prompt_embeddings' tensor (keys: {sorted(tensors)})")
    return config, tensors["prompt_embeddings"].float()


def check_adapter(config: dict, vectors: torch.Tensor, expected_type: tuple[str, ...], width: int, layers: int | None,
                  key: str = "model.init_args.adapter") -> int:
    """Check an adapter fits this method and backbone; return its number of virtual tokens."""
    kind = config.get("peft_type")
    if kind not in expected_type:
        raise AdapterError(f"{key}: the adapter is {kind}; this method reads {' or '.join(expected_type)}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{key}: adapters for encoder-decoder models (2 transformer submodules) are not supported")
    if vectors.dim() != 2 or vectors.size(1) != width:
        raise AdapterError(
            f"{key}: prompt_embeddings has shape {tuple(vectors.shape)}, but this backbone needs (N, {width}); "
            "was it trained on another backbone?"
        )
    if layers is not None and config.get("num_layers") not in (None, layers):
        raise AdapterError(f"{key}: the adapter is for {config.get('num_layers')} layers; this backbone has {layers}")
    return int(vectors.size(0))
