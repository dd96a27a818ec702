"""What a promptlit checkpoint holds, how it is written, and the checks made before one is loaded.

* A frozen-backbone method keeps only its trained weights (and method buffers); Lightning adds the
  optimizer, scheduler and loop state, so ``fit --ckpt_path`` resumes exactly.
* ``checkpoint["promptlit"]`` records the method, the backbone's name and a fingerprint of the
  backbone it started from; loading into another method or backbone is refused with a clear error.
* :class:`AtomicCheckpointIO` writes to a temporary file, fsyncs and renames: a crash mid-save leaves
  the previous checkpoint whole.
* :func:`check_checkpoint_file` opens a checkpoint with ``weights_only=True`` before Lightning does,
  so a truncated or foreign file gets a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


@torch.no_grad()
def backbone_fingerprint(backbone) -> str:
    """A short hash of the backbone's architecture and a sample of its embedding table, rounded to
    bf16 so it does not change when a frozen backbone is stored in bf16."""
    cfg = backbone.config.get_text_config()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    digest = hashlib.sha256(json.dumps({k: getattr(cfg, k, None) for k in keys}, sort_keys=True).encode())
    table = backbone.get_input_embeddings().weight
    sample = table[:: max(1, table.size(0) // 64)][:64, :64]
    digest.update(sample.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def metadata(module) -> dict:
    """The method, backbone and label words a checkpoint was trained with. The label words and labels
    come from the data module (not the module's hyperparameters), so a module loaded by hand
    (``load_from_checkpoint``, no data module) takes them from here."""
    return {"version": FORMAT_VERSION, "method": type(module).__name__, "backbone": module.hparams.get("backbone"),
            "fingerprint": module.backbone_fingerprint, "tune_backbone": module.tune_backbone,
            "verbalizer": module.verbalizer, "labels": list(module.labels) if module.verbalizer else None}


def stored_label_words(path, weights_only: bool = True) -> dict:
    """``verbalizer`` and ``labels`` recorded in a promptlit checkpoint (none for text-answer tasks,
    checkpoints written before they were recorded, or a file that does not load: Lightning's own
    load then says why)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception:
        return {}
    meta = (ckpt.get("promptlit") if isinstance(ckpt, dict) else None) or {}
    return {k: meta[k] for k in ("verbalizer", "labels") if meta.get(k)}


def rng_state() -> dict:
    """The torch (CPU and CUDA) and Python random states, in types a weights-only load accepts."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back :func:`rng_state`'s states (CUDA only where this process has as many devices)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def trim_state(module, checkpoint: dict) -> None:
    """Drop frozen backbone weights from ``checkpoint`` unless the backbone is tuned."""
    checkpoint["promptlit"] = metadata(module)
    if module.tune_backbone:
        return
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                if not k.startswith("backbone.") or k in trained}


def check_compatible(module, checkpoint: dict) -> None:
    """Refuse a checkpoint of another method, another backbone or other shapes, before loading it."""
    meta = checkpoint.get("promptlit")
    if meta is None:
        raise CheckpointError("ckpt_path: the checkpoint has no promptlit metadata; it was not written by promptlit")
    if meta["method"] != type(module).__name__:
        raise CheckpointError(
            f"ckpt_path: the checkpoint was written by {meta['method']}, but model.class_path is {type(module).__name__}"
        )
    if meta["fingerprint"] != module.backbone_fingerprint:
        raise CheckpointError(
            f"ckpt_path: the checkpoint was trained on backbone '{meta['backbone']}' (fingerprint {meta['fingerprint']}), "
            f"but model.init_args.backbone is '{module.hparams.get('backbone')}' (fingerprint {module.backbone_fingerprint})"
        )
    ours = module.state_dict()
    for key, value in checkpoint["state_dict"].items():
        if key in ours and tuple(ours[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"ckpt_path: '{key}' has shape {tuple(value.shape)} in the checkpoint but {tuple(ours[key].shape)} here; "
                "the model.init_args (e.g. num_virtual_tokens) differ from the run that wrote it"
            )
    heads = sorted(k for k in checkpoint["state_dict"] if k.startswith("readout.") and k not in ours)
    if heads:  # a trained head (classification or span) that this readout has no place for: its weights would be dropped
        raise CheckpointError(
            f"ckpt_path: the checkpoint holds the weights of a trained head ({', '.join(heads)}), but this "
            f"{type(module).__name__} reads answers through {type(module.readout).__name__}; set "
            "model.init_args.readout (and the task) as in the run that wrote it"
        )
    method = [n for n, _ in module.named_parameters() if not n.startswith("backbone.")]
    missing = sorted(k for k in method if k not in checkpoint["state_dict"])
    if missing:
        raise CheckpointError(f"ckpt_path: the checkpoint lacks {missing[:3]}; it does not match model.init_args")


def check_checkpoint_file(path: str | os.PathLike, key: str = "ckpt_path") -> None:
    """Open ``path`` the way it will be loaded (weights only) and turn any failure into one line."""
    if str(path) in ("last", "best", "hpc", "registry") or "://" in str(path):
        return  # resolved by Lightning
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{key}: {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # zip, unpickling and weights-only errors all mean "cannot load this"
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{key}: {p} is not a readable checkpoint (truncated, corrupt or not a torch file): {reason}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{key}: {p} is a torch file but not a Lightning checkpoint (no state_dict)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, fsync, then rename over the target."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        """One weights-only load; a failure becomes the same one-line error as the CLI's check."""
        if not Path(path).is_file():
            raise CheckpointError(f"ckpt_path: {path} does not exist")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"ckpt_path: {path} is not a readable checkpoint (truncated, corrupt or not a torch file): {reason}") from None
