"""How a backbone runs on the trainer's device: weight dtype, attention kernel, the fused RMSNorm
for training, frozen linear layers on oneDNN's packed weights (sibling projections stacked), and
optional regional ``torch.compile``. Chosen in ``setup`` once the trainer's
precision and device are known.

Defaults (measured on a 2-core AVX512-BF16 CPU with SmolLM2-135M, ``benchmarks/step_speed.py``):
a frozen backbone's weights are stored in bf16 under ``bf16-mixed`` (no per-step weight casts;
method parameters stay fp32), and attention is ``grouped`` (``prompt_methods/attention.py``) for
decoder-only backbones on CPU and ``eager`` for the others there, since the CPU flash-attention
backward of ``sdpa`` is slow; ``sdpa`` on accelerators. Compilation is off by default: it pays only
for runs long enough to amortize the compile.
"""

from __future__ import annotations

import weakref
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


def check_settings(dtype: str, attn: str, residual: str = "float32", pack: bool | str = "auto") -> None:
    """Refuse an unknown ``backbone_dtype``, ``attn_implementation``, ``residual_dtype`` or
    ``pack_weights``, naming the config key."""
    if pack not in (True, False, "auto"):
        raise ValueError(f"model.init_args.pack_weights: '{pack}' is not auto, true or false")
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


def checkpointed_pass(backbone: nn.Module) -> bool:
    """Whether the backbone's layers run under gradient checkpointing in this pass (training mode, with
    gradients), so that the backward runs each layer again. transformers then drops a key/value cache
    handed to a layer (a cache written twice would hold its keys twice): a prefix or a prompt's cache
    never reaches attention. Reads the flag transformers sets on each checkpointed layer, on the last
    one, found once (``is_activation_checkpointing`` walks every module, 1.3 ms a call on SmolLM2)."""
    last, _ = _tail(backbone)
    return (last is not None and getattr(last, "gradient_checkpointing", False) is True and last.training
            and torch.is_grad_enabled())


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
    a compiled layer (its graph calls the parts itself), a checkpointed pass (:func:`checkpointed_pass`: its
    backward runs the layer again, outside this block) or :data:`TRIM_TAIL` off run the whole layer."""
    last, parts = _tail(backbone) if keep and TRIM_TAIL else (None, [])
    if last is None or checkpointed_pass(backbone) or _compiled(last) or any(_compiled(m) for m in parts):
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
        if _bound_to(module, forward):
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



#: switched off by benchmarks that compare against plain matmuls (:func:`pack_linears`)
PACK_LINEARS = True
#: sibling linear layers that a layer calls on the same input one after the other (Llama-style
#: attention and gated MLPs): :func:`pack_linears` runs each such set as one matmul
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_PACK_DTYPES = (torch.float32, torch.bfloat16)


def _pack_ops_available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise"))


class _Packed:
    """Linear layers that run as one matmul on oneDNN's packed copy of their stacked weights (one layer,
    or siblings reading the same input). Holds the layers weakly; packs on first use and again whenever
    a weight's storage or version changes; the input-gradient copy (the stacked weight transposed) is
    packed at the first backward. A sibling's share of a product waits in ``ready`` for its own call."""

    def __init__(self, members: list[nn.Linear]):
        self.members = [weakref.ref(m) for m in members]
        self.sizes = [m.out_features for m in members]
        self.key, self.weight, self.weight_t, self.bias = None, None, None, None
        self.storages: list[weakref.ref] = []
        self.ready: dict[int, tuple] = {}

    def modules(self) -> list[nn.Linear] | None:
        mods = [ref() for ref in self.members]
        return None if any(m is None for m in mods) else mods

    def packs(self, mods: list[nn.Linear], rows: int, backward: bool = False):
        key = tuple((m.weight.data_ptr(), _version(m.weight), m.weight.dtype) for m in mods)
        storages = [m.weight.untyped_storage() for m in mods]
        # the storages themselves too: a weight cast away and back (``.bfloat16().float()``) can get a new
        # storage at the freed address of its old one, with the same pointer, version and dtype
        if key != self.key or len(storages) != len(self.storages) or any(
                ref() is not storage for ref, storage in zip(self.storages, storages)):
            self.key, self.weight_t = key, None
            self.storages = [weakref.ref(storage) for storage in storages]  # weak: a freed weight is not kept
            self.weight = torch.ops.mkldnn._reorder_linear_weight(_stacked(mods, "weight"), rows)
            self.bias = None if mods[0].bias is None else _stacked(mods, "bias")
        if backward and self.weight_t is None:
            self.weight_t = torch.ops.mkldnn._reorder_linear_weight(_stacked(mods, "weight").t().contiguous(), rows)
        return self.weight_t if backward else self.weight


def _stacked(mods: list[nn.Linear], name: str) -> torch.Tensor:
    """The layers' weights (or biases) one after the other along the output axis, detached."""
    tensors = [getattr(m, name).detach() for m in mods]
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


#: linear layer -> its :class:`_Packed`; weak, so that a freed model frees its packs (a deep copy's
#: layers have no entry and pack alone, until :func:`pack_linears` runs on the copy)
_GROUPS: "weakref.WeakKeyDictionary[nn.Module, _Packed]" = weakref.WeakKeyDictionary()


class _PackedLinear(torch.autograd.Function):
    """``x @ W.T + b`` for frozen ``W`` through oneDNN's packed copies of ``W`` (the forward) and of
    ``W.T`` (the input gradient). No weight or bias gradient: used only where neither is trained."""

    @staticmethod
    def forward(ctx, x, group, mods):
        ctx.group, ctx.rows = group, max(1, x.numel() // max(1, x.size(-1)))  # the layers stay weakly held
        packed = group.packs(mods, ctx.rows)
        return torch.ops.mkldnn._linear_pointwise(x, packed, group.bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        mods = ctx.group.modules()
        if mods is None and ctx.group.weight_t is None:
            raise RuntimeError("a packed linear layer was freed before its backward ran")
        packed_t = ctx.group.packs(mods, ctx.rows, backward=True) if mods is not None else ctx.group.weight_t
        return torch.ops.mkldnn._linear_pointwise(grad.contiguous(), packed_t, None, "none", [], ""), None, None


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version (an inference tensor has none, and cannot change in place)."""
    return -1 if tensor.is_inference() else tensor._version


def _eligible(module: nn.Module, dtype: torch.dtype) -> bool:
    weight, bias = module.weight, module.bias
    return (not weight.requires_grad and weight.dtype == dtype and weight.device.type == "cpu"
            and (bias is None or (not bias.requires_grad and bias.dtype == dtype)))


def _split(group: _Packed) -> None:
    """The group's layers go on alone (a sibling was called without the others, or one is trained)."""
    for module in group.modules() or []:
        _GROUPS[module] = _Packed([module])


def linear_forward(self, x):
    """The forward :func:`pack_linears` gives an ``nn.Linear``: :class:`_PackedLinear` where the weight
    is frozen, on the CPU, fp32 or bf16, and the input has (or autocast gives it) the weight's dtype;
    the class's forward otherwise. A layer with siblings computes their products too, in the same
    matmul, and each sibling called next on the same input takes its share. Bound to the module as a
    method, as :func:`forward` is."""
    weight = self.weight
    if (not PACK_LINEARS or not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.device.type != "cpu"
            or x.numel() == 0 or self.__dict__.get("_promptlit_unpackable", False)):
        return type(self).forward(self, x)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype not in _PACK_DTYPES or not _eligible(self, dtype):
        return type(self).forward(self, x)
    group = _GROUPS.get(self)
    mods = None if group is None else group.modules()
    if mods is None or self not in mods:
        group, mods = _Packed([self]), [self]
        _GROUPS[self] = group
    index = mods.index(self)
    if len(mods) > 1:
        ready = group.ready.pop(index, None)
        if ready is not None and ready[0]() is x and ready[1] == _version(x) and ready[2] == torch.is_grad_enabled():
            return ready[3]
        if ready is not None or group.ready or not all(_eligible(m, dtype) for m in mods):
            # a share computed for another input, or one nobody took: not siblings here
            group.ready.clear()
            _split(group)
            return linear_forward(self, x)
    try:
        out = _PackedLinear.apply(x.to(dtype), group, mods)
    except RuntimeError:  # a oneDNN build that refuses this dtype or shape: the plain matmul, from now on
        for module in mods:
            module.__dict__["_promptlit_unpackable"] = True
        return type(self).forward(self, x)
    if len(mods) == 1:
        return out
    shares = out.split(group.sizes, dim=-1)
    grad = torch.is_grad_enabled()
    group.ready = {i: (weakref.ref(x), _version(x), grad, share) for i, share in enumerate(shares) if i != index}
    return shares[index]


def _siblings(parent: nn.Module) -> list[list[nn.Linear]]:
    found = []
    for names in SIBLINGS:
        mods = [parent._modules.get(name) for name in names]
        if (all(type(m) is nn.Linear for m in mods) and len({m.in_features for m in mods}) == 1
                and len({m.weight.dtype for m in mods}) == 1 and len({m.bias is None for m in mods}) == 1):
            found.append(mods)
    return found


def pack_linears(backbone: nn.Module) -> int:
    """Run the backbone's plain ``nn.Linear`` layers whose weights are frozen on oneDNN's packed weights
    (:func:`linear_forward`), and each set of :data:`SIBLINGS` as one matmul: the same products
    (bitwise, on the shapes checked), faster on a CPU (``benchmarks/runtime_switch.py --switch
    pack_linears``), for up to two packed copies of the frozen weights in memory (the input-gradient
    copy only once a backward runs). Packing happens at a layer's first call, so layers that never run
    on the CPU cost nothing; trained weights, other devices and compiled layers keep the plain forward.
    Returns the number of layers switched (0 where this torch has no oneDNN)."""
    if not _pack_ops_available():
        return 0
    count = 0
    for parent in backbone.modules():
        for mods in _siblings(parent):
            if not all("forward" not in m.__dict__ or _bound_to(m, linear_forward) for m in mods):
                continue
            group = _GROUPS.get(mods[0])
            if group is None or group.modules() != mods:
                group = _Packed(mods)
                for module in mods:
                    _GROUPS[module] = group
    for module in backbone.modules():
        if _bound_to(module, linear_forward):
            count += 1
        elif type(module) is nn.Linear and "forward" not in module.__dict__ and not _compiled(module):
            module.forward = linear_forward.__get__(module)
            count += 1
    return count


#: ``pack_weights: auto`` packs where the packed copies would take at most this share of the memory
#: available at setup
PACK_MEMORY_SHARE = 0.25


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def packed_bytes(backbone: nn.Module) -> int:
    """The most memory :func:`pack_linears` adds: two packed copies of every frozen linear weight."""
    return 2 * sum(m.weight.numel() * m.weight.element_size() for m in backbone.modules()
                   if type(m) is nn.Linear and not m.weight.requires_grad)


def should_pack(setting: bool | str, backbone: nn.Module, device_type: str) -> bool:
    """``pack_weights``: never off the CPU; ``auto`` where the packed copies fit in
    :data:`PACK_MEMORY_SHARE` of the available memory (or that is unknown)."""
    if setting is False or device_type != "cpu":
        return False
    if setting is True:
        return True
    free = available_memory()
    return free is None or packed_bytes(backbone) <= PACK_MEMORY_SHARE * free


def _bound_to(module: nn.Module, function) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is function
