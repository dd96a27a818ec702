"""How a backbone runs on the trainer's device: weight dtype, attention kernel, the fused RMSNorm
for training, and optional regional ``torch.compile``. Chosen in ``setup`` once the trainer's
precision and device are known.

Defaults (measured on a 2-core AVX512-BF16 CPU with SmolLM2-135M, ``benchmarks/step_speed.py``):
a frozen backbone's weights are stored in bf16 under ``bf16-mixed`` (no per-step weight casts;
method parameters stay fp32), and attention is ``grouped`` (``prompt_methods/attention.py``) for
decoder-only backbones on CPU and ``eager`` for the others there, since the CPU flash-attention
backward of ``sdpa`` is slow; ``sdpa`` on accelerators. Compilation is off by default: it pays only
for runs long enough to amortize the compile.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from prompt_methods import attention as _attention  # registers the ``grouped`` kernel with transformers

ATTENTION = ("auto", "eager", "sdpa", _attention.NAME)
#: the ``torch.compile`` backend for ``compile: true``
COMPILE_BACKEND = "inductor"
DTYPES = ("auto", "float32", "bfloat16")
#: the dtype of the hidden states between a 16-bit backbone's layers under autocast (``Feeding.stream``)
RESIDUAL_DTYPES = ("float32", "bfloat16")


def check_settings(dtype: str, attn: str, residual: str = "float32") -> None:
    """Refuse an unknown ``backbone_dtype``, ``attn_implementation`` or ``residual_dtype``, naming the config key."""
    if dtype not in DTYPES:
        raise ValueError(f"model.init_args.backbone_dtype: '{dtype}' is not auto, float32 or bfloat16")
    if residual not in RESIDUAL_DTYPES:
        raise ValueError(f"model.init_args.residual_dtype: '{residual}' is not float32 or bfloat16")
    if attn not in ATTENTION:
        raise ValueError(f"model.init_args.attn_implementation: '{attn}' is not one of {', '.join(ATTENTION)}")


def backbone_dtype(setting: str, precision: str, tune_backbone: bool) -> torch.dtype:
    """The weight dtype of the backbone: bf16 when asked, or (``auto``) when the trainer runs bf16
    and the backbone is frozen; fp32 otherwise (a tuned backbone keeps fp32 master weights)."""
    if setting == "bfloat16" or (setting == "auto" and precision.startswith("bf16") and not tune_backbone):
        return torch.bfloat16
    return torch.float32


def norms_to_fp32(backbone: nn.Module) -> None:
    """Keep the norm layers' weights of a 16-bit backbone in fp32, so that an fp32 residual stream
    stays fp32 through them (``nn.LayerNorm`` on a CPU refuses fp32 inputs with bf16 weights; some
    RMSNorms, T5's, cast their input to a 16-bit weight's dtype). Norms are the leaf modules whose
    class name says so."""
    for module in backbone.modules():
        if "norm" in type(module).__name__.lower() and next(module.children(), None) is None:
            module.float()


def rope_tables(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of the backbone's rotary-embedding frequencies (buffers named ``*inv_freq``).

    ``backbone.to(torch.bfloat16)`` casts buffers as well as weights, which rounds these to 8 bits of
    mantissa (up to 0.3% off on SmolLM2: a RoPE angle off by that share of ``position x frequency``);
    ``from_pretrained(dtype=...)`` keeps them fp32, and the rotary layers compute in fp32 anyway."""
    return {name: buf.detach().clone() for name, buf in backbone.named_buffers()
            if name.endswith("inv_freq") and buf.dtype == torch.float32}


def restore_rope(backbone: nn.Module, tables: dict[str, torch.Tensor]) -> None:
    """Put back the fp32 frequencies of :func:`rope_tables` where a cast made them 16-bit."""
    for name, table in tables.items():
        owner, _, attr = name.rpartition(".")
        module = backbone.get_submodule(owner)
        current = module._buffers.get(attr)
        if current is not None and current.dtype != table.dtype:
            module._buffers[attr] = table.to(current.device)


def attention(setting: str, device_type: str, kind: str = "causal") -> str:
    """The attention implementation: ``auto`` is ``grouped`` for decoder-only backbones on CPU,
    eager for other backbones there, sdpa on accelerators."""
    if setting == "auto":
        if device_type != "cpu":
            return "sdpa"
        return _attention.NAME if kind == "causal" else "eager"
    return setting


def repeated_blocks(backbone: nn.Module) -> nn.ModuleList | None:
    """The backbone's stack of transformer layers: its longest ``ModuleList`` of modules of one class."""
    best = None
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


def compile_blocks(backbone: nn.Module, attention: bool = True) -> int:
    """Compile each transformer layer in place (regional compilation: the layers share one compiled
    graph, so the compile costs about one layer's, not the whole model's). Sequence lengths vary
    between batches, so shapes are dynamic. ``attention=False`` compiles each layer's other parts
    (MLP, norms) and leaves attention eager: for methods that hand the layers a key/value cache,
    whose per-layer bookkeeping would make every layer compile anew. Returns the number of layers."""
    blocks = repeated_blocks(backbone)
    if blocks is None:
        raise ValueError("model.init_args.compile: the backbone has no stack of repeated layers to compile")
    for block in blocks:
        if attention:
            block.compile(dynamic=True, backend=COMPILE_BACKEND)
            continue
        for child in block.children():
            if "attention" not in type(child).__name__.lower():
                child.compile(dynamic=True, backend=COMPILE_BACKEND)
    return len(blocks)


#: the parts of a transformer layer that work on each position alone, after attention has mixed
#: the positions (the MLP, attention's output projection): in the last layer their output is needed
#: only where the caller reads it (:func:`last_layer_reads`)
TAIL_PARTS = ("mlp", "self_attn.o_proj")
#: switched off by tests and benchmarks that compare against the whole last layer
TRIM_TAIL = True


def _tail(backbone: nn.Module) -> tuple[nn.Module | None, list[nn.Module]]:
    """The backbone's last layer and those of its :data:`TAIL_PARTS` it has, looked up once."""
    if "_promptlit_tail" not in backbone.__dict__:
        blocks = repeated_blocks(backbone)
        last = None if blocks is None else blocks[-1]
        parts = []
        for path in TAIL_PARTS if last is not None else ():
            try:
                parts.append(last.get_submodule(path))
            except AttributeError:
                pass
        backbone.__dict__["_promptlit_tail"] = (last, parts)  # plain attributes, not registered submodules
    return backbone.__dict__["_promptlit_tail"]


def _compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@contextmanager
def last_layer_reads(backbone: nn.Module, keep: int | None):
    """Within this block, the last layer's MLP and attention output projection run only on each
    row's last ``keep`` positions, for callers that read only those positions of the last hidden
    states (the answer position; an answer's tokens). The other positions of the layer's output then
    hold its input plus part of its update: they must not be read.

    Keys and values of the last layer are still computed at every position, so a cache returned from
    the pass is complete. In SmolLM2's layers the two parts are 84% of a position's matmul work, so
    this skips nearly 1/30 of a short sequence's matmuls, forward and backward alike. ``keep=None``,
    a compiled layer (its graph calls the parts itself), gradient checkpointing (its backward runs the
    layer again, outside this block) or :data:`TRIM_TAIL` off run the whole layer."""
    last, parts = _tail(backbone) if keep and TRIM_TAIL else (None, [])
    # transformers marks a checkpointed layer (and the base model) with ``gradient_checkpointing``; its
    # ``is_activation_checkpointing`` walks every module, 1.3 ms a call on SmolLM2: too slow per forward
    checkpointing = last is not None and any(getattr(m, "gradient_checkpointing", False) is True
                                             for m in (last, getattr(backbone, "base_model", backbone)))
    if last is None or checkpointing or _compiled(last) or any(_compiled(m) for m in parts):
        parts = []
    saved = []
    for module in parts:
        if not module.__dict__.get("_promptlit_whole", False):
            saved.append((module, module.__dict__.get("forward")))
            module.forward = _tail_forward(module, module.forward, keep)
    try:
        yield
    finally:
        for module, own in reversed(saved):
            del module.forward
            if own is not None:
                module.forward = own


def _tail_forward(module: nn.Module, forward, keep: int):
    def run(hidden, *args, **kwargs):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.size(1) <= keep:
            return forward(hidden, *args, **kwargs)
        out = forward(hidden[:, -keep:], *args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape[:2] != (hidden.size(0), keep):
            # not a plain per-position map (a mixture of experts returns router logits too): run it
            # whole, now and from now on
            module.__dict__["_promptlit_whole"] = True
            return forward(hidden, *args, **kwargs)
        return F.pad(out, (0, 0, hidden.size(1) - keep, 0))

    return run


#: switched off by benchmarks that compare against the models' own RMSNorm (:func:`fuse_norms`)
FUSE_NORMS = True
_EPS_NAMES = ("variance_epsilon", "eps")


#: torch's fused RMSNorm kernel (output and reciprocal rms in one pass), where this torch has it
_FUSED_RMS = getattr(torch.ops.aten, "_fused_rms_norm", None)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight * x / rms(x)`` and the reciprocal rms, from torch's fused kernel where there is one."""
    if _FUSED_RMS is not None:
        return _FUSED_RMS(x, [x.size(-1)], weight, eps)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * rstd * weight, rstd


class _RMSNorm(torch.autograd.Function):
    """An fp32 RMSNorm whose backward is the closed form: five elementwise passes and one autograd node
    instead of the chain of nodes autograd records for the models' own pow/mean/rsqrt/mul forward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        with torch.autocast(x.device.type, enabled=False):
            out, rstd = _rms(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # d/dx of w·x·r with r = (mean(x²) + eps)^-1/2: r·(g·w) − x·r³·mean(g·w·x)
            gw = grad * weight
            dot = (gw * x).mean(-1, keepdim=True)
            grad_x = torch.addcmul(gw, x, dot * rstd * rstd, value=-1).mul_(rstd)
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x * rstd).reshape(-1, x.size(-1)).sum(0)
        return grad_x, grad_w, None


def _eps(module: nn.Module) -> float | None:
    for name in _EPS_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def forward(self, hidden, *args, **kwargs):
    """The forward :func:`fuse_norms` gives a norm: :class:`_RMSNorm` on fp32 inputs where gradients
    are recorded, its class's forward otherwise (without gradients there is no backward to shorten).
    Bound to the module as a method, so that a deep copy of the model binds it to the copy."""
    weight = self.weight
    if (not FUSE_NORMS or args or kwargs or not torch.is_grad_enabled() or not isinstance(hidden, torch.Tensor)
            or hidden.dtype != torch.float32 or weight.dtype != torch.float32 or hidden.device != weight.device):
        return type(self).forward(self, hidden, *args, **kwargs)
    return _RMSNorm.apply(hidden, weight, _eps(self))


def _fusable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (_eps(module) is not None and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and "rmsnorm" in type(module).__name__.lower() and next(module.children(), None) is None
            and "forward" not in module.__dict__ and not _compiled(module))


def _same_as_fused(module: nn.Module) -> bool:
    """Whether the module's own forward computes ``weight * x / rms(x)`` on a random fp32 input."""
    weight = module.weight.detach().float()
    probe = torch.randn(2, 3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        try:
            own = type(module).forward(module, probe)
        except Exception:  # noqa: BLE001 - a norm with another signature keeps its own forward
            return False
        mine = _rms(probe, weight, _eps(module))[0]
    return isinstance(own, torch.Tensor) and own.shape == mine.shape and torch.allclose(own.float(), mine, rtol=1e-5, atol=1e-6)


def fuse_norms(backbone: nn.Module) -> int:
    """Run the backbone's RMSNorms on fp32 inputs through :class:`_RMSNorm`: the same output (the
    fused kernel's, bitwise Llama's on the shapes checked) and a shorter backward.

    A norm is taken only where a probe shows that it computes exactly that: a leaf module named
    ``*RMSNorm`` with a vector ``weight`` and an ``eps``/``variance_epsilon``, whose own output on a
    random fp32 input matches ``weight * x / rms(x)`` (Gemma's ``1 + weight`` does not, and keeps
    its own forward). Other dtypes (a bf16 residual stream) run the module's own forward, and
    compiled layers are left alone. Returns the number of norms running fused."""
    count, verdict = 0, {}
    for module in backbone.modules():
        bound = module.__dict__.get("forward")
        if getattr(bound, "__func__", None) is forward:
            count += 1
            continue
        if not _fusable(module):
            continue
        if type(module) not in verdict:
            verdict[type(module)] = _same_as_fused(module)
        if verdict[type(module)]:
            module.forward = forward.__get__(module)
            count += 1
    return count
