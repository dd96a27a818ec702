"""bf16-mixed on CPU for every method: frozen backbones run in bf16, method parameters stay fp32."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from prompt_methods import FineTuning
from test_methods import METHODS


@pytest.mark.parametrize("name", [n for n in METHODS if n != "hard_prompt"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_bf16_mixed_fit(name, arch, tiny, make_data):
    cls, kwargs = METHODS[name]
    backbone = tiny(arch)
    dm = make_data(backbone)
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, **kwargs)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", fast_dev_run=True, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    backbone_dtype = next(model.backbone.parameters()).dtype
    assert backbone_dtype == (torch.float32 if model.tune_backbone else torch.bfloat16)
    for n, p in model.named_parameters():
        if p.requires_grad and not n.startswith("backbone."):
            assert p.dtype == torch.float32, n


def test_runtime_settings_are_checked_when_the_module_is_built(tiny, make_data):
    from prompt_methods import SoftPrompt

    dm = make_data(tiny("llama"))
    with pytest.raises(ValueError, match="model.init_args.attn_implementation: 'flash'"):
        SoftPrompt(backbone=tiny("llama"), verbalizer=dm.verbalizer, attn_implementation="flash")
    with pytest.raises(ValueError, match="model.init_args.backbone_dtype: 'fp16'"):
        SoftPrompt(backbone=tiny("llama"), verbalizer=dm.verbalizer, backbone_dtype="fp16")


@pytest.mark.parametrize("method,backend", [("soft_prompt", "aot_eager"), ("soft_prompt", "inductor"), ("prefix_tuning", "aot_eager")])
def test_compiled_layers_match_eager(method, backend, tiny, make_data, monkeypatch):
    """``compile: true`` compiles each transformer layer once (dynamic shapes): same loss and method
    gradient as the uncompiled module, on two batches of different lengths. ``aot_eager`` checks the
    captured forward and backward graphs; ``inductor`` (the default backend) also its generated code.
    Prefix tuning feeds a key/value cache, so its attention stays eager and the rest is compiled."""
    from prompt_methods import PrefixTuning, SoftPrompt, runtime

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", backend)
    cls, kwargs, param = {"soft_prompt": (SoftPrompt, {}, "prompt"),
                          "prefix_tuning": (PrefixTuning, {"init": "random"}, "prefix.kv")}[method]
    backbone = tiny("llama")
    dm = make_data(backbone, batch_size=3)
    batches = [b for _, b in zip(range(2), dm.train_dataloader())]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    results = []
    for compile_layers in (False, True):
        torch.manual_seed(0)
        model = cls(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=4, compile=compile_layers, **kwargs)
        model.setup("fit")
        assert model._compiled == (2 if compile_layers else 0)
        if compile_layers:
            block = runtime.repeated_blocks(model.backbone)[0]
            whole = block._compiled_call_impl is not None
            assert whole == (method != "prefix_tuning")
            if not whole:  # the MLP and norms compiled, attention left eager
                assert block.mlp._compiled_call_impl is not None and block.self_attn._compiled_call_impl is None
        weights = dict(model.named_parameters())[param]
        out = []
        for batch in batches:
            weights.grad = None
            loss = model.loss(batch)[0]
            loss.backward()
            out.append((loss.detach(), weights.grad.clone()))
        results.append(out)
    for (loss_a, grad_a), (loss_b, grad_b) in zip(*results):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-3, atol=1e-5)
    assert runtime.repeated_blocks(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="model.init_args.compile"):
        runtime.compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("name", ["soft_prompt", "prefix_tuning", "p_tuning", "hard_prompt_tuned"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("residual", ["float32", "bfloat16"])
def test_residual_stream_dtype_under_bf16_mixed(name, arch, residual, tiny, make_data):
    """``bf16-mixed`` with a frozen backbone stored in bf16: its matmuls run in bf16 either way; the
    hidden states between its layers are fp32 with ``residual_dtype: float32`` (the default) and
    bf16 with ``bfloat16``. The prompt (soft prompt, prefix keys/values, P-tuning's slots) trains in
    both. A tuned backbone keeps fp32 weights: its stream is fp32 whatever the setting."""
    from prompt_methods import runtime

    cls, kwargs = METHODS[name]
    backbone = tiny(arch)
    template = "{soft:2} {sentence} {soft:1} It was {mask} ." if name == "p_tuning" else None
    dm = make_data(backbone, **({"template": template} if template else {}))
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, residual_dtype=residual, **kwargs)
    blocks = runtime.repeated_blocks(model.backbone)
    seen = {"layers": set(), "linear": set()}
    for block in blocks:
        block.register_forward_hook(lambda m, i, o: seen["layers"].add((o[0] if isinstance(o, tuple) else o).dtype))
    linear = next(m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    linear.register_forward_hook(lambda m, i, o: seen["linear"].add(o.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith("backbone.") == model.tune_backbone and "readout" not in n}  # what trains
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", fast_dev_run=True, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    stream = torch.float32 if residual == "float32" or model.tune_backbone else torch.bfloat16
    assert seen["layers"] == {stream}
    assert seen["linear"] == {torch.bfloat16}
    assert model.fp32_stream == (residual == "float32" and not model.tune_backbone)
    norms = [m for m in model.backbone.modules() if "norm" in type(m).__name__.lower() and next(m.children(), None) is None]
    assert norms and {p.dtype for m in norms for p in m.parameters()} == {stream}
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert moved


def test_residual_dtype_is_checked(tiny, make_data):
    from prompt_methods import SoftPrompt

    dm = make_data(tiny("llama"))
    with pytest.raises(ValueError, match="model.init_args.residual_dtype: 'fp16'"):
        SoftPrompt(backbone=tiny("llama"), verbalizer=dm.verbalizer, residual_dtype="fp16")




@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_rotary_frequencies_stay_fp32_when_the_backbone_is_cast(precision, tiny, make_data):
    """A cast to bf16 (the frozen backbone under ``bf16-mixed``; Lightning's ``bf16-true`` casting
    the whole module; ``.to()``/``.half()``) keeps the RoPE frequencies as loaded, in fp32: rounded
    to bf16 they are off by up to 0.3% (an angle error growing with the position)."""
    from prompt_methods import SoftPrompt

    backbone = tiny("llama")
    dm = make_data(backbone)
    model = SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=2)
    loaded = {n: b.clone() for n, b in model.backbone.named_buffers() if n.endswith("inv_freq")}
    assert loaded and all(not torch.equal(b.bfloat16().float(), b) for b in loaded.values())  # bf16 would round them
    trainer = L.Trainer(accelerator="cpu", precision=precision, fast_dev_run=True, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    for cast in (lambda m: m, lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(model)
        buffers = dict(model.backbone.named_buffers())
        for name, table in loaded.items():
            assert buffers[name].dtype == torch.float32 and torch.equal(buffers[name], table), name


@pytest.mark.parametrize("name", ["soft_prompt", "prefix_tuning", "p_tuning", "head"])
def test_method_parameters_stay_fp32_under_bf16_true(name, tiny, make_data):
    """``bf16-true`` casts the whole module; the trained parameters (prompt, prefix, encoder, a new head)
    keep their fp32 values, as PEFT keeps an adapter's, so AdamW's small updates are not rounded away,
    and they train: after a step each has moved by less than bf16 could represent near its values."""
    from prompt_methods import PrefixTuning, PTuning, SoftPrompt

    backbone = tiny("llama")
    dm = make_data(backbone)
    cls, kwargs = {"soft_prompt": (SoftPrompt, {}), "prefix_tuning": (PrefixTuning, {}),
                   "p_tuning": (PTuning, {"encoder": "mlp"}), "head": (SoftPrompt, {"readout": "head"})}[name]
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=2, lr=1e-6, **kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("backbone.")}
    assert before and all(p.dtype == torch.float32 for p in before.values())
    trainer = L.Trainer(accelerator="cpu", precision="bf16-true", max_steps=1, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    after = dict(model.named_parameters())
    for n, start in before.items():
        p = after[n]
        assert p.dtype == torch.float32, n
        step = (p.detach() - start).abs()
        moved = step > 0
        assert moved.any(), n  # it trained
        # an lr of 1e-6 moves each value by about 1e-6: below half a bf16 step of values above 1e-3, so in
        # bf16 those entries could not have moved at all
        big = start.abs() > 1e-3
        assert (moved & big).any(), n
    model.to(torch.bfloat16)  # a later cast by hand keeps them too
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("precision,clip", [("bf16-mixed", None), ("bf16-mixed", 1.0), ("32-true", None), ("bf16-true", None)])
def test_adamw_is_fused_unless_gradients_are_clipped(precision, clip, tiny, make_data):
    """The methods' AdamW is torch's fused kernel (one pass per parameter; for a tuned backbone most of
    the optimizer's time goes), except with gradient clipping, which Lightning's mixed precision
    cannot do before a fused step: then the unfused one, and the fit runs either way."""
    from prompt_methods.optim import fused_adamw_fits

    dm = make_data(tiny("llama"))
    model = FineTuning(backbone=tiny("llama"), verbalizer=dm.verbalizer)
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=2, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        gradient_clip_val=clip)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    trainer.fit(model, datamodule=dm)
    opt = trainer.optimizers[0]
    assert bool(opt.defaults.get("fused")) is (clip is None)
    assert all(bool(g.get("fused")) is (clip is None) for g in opt.param_groups)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b.to(a.dtype)) for a, b in zip(after, before))
    assert not fused_adamw_fits([torch.zeros(2, dtype=torch.long)])  # integer tensors have no fused kernel
    assert not fused_adamw_fits([])


def test_fused_adamw_matches_the_unfused_update():
    """The fused AdamW moves parameters as the unfused one does, up to rounding."""
    from prompt_methods.optim import adamw

    torch.manual_seed(0)
    a = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a = adamw([{"params": a[:1], "weight_decay": 0.01}, {"params": a[1:], "weight_decay": 0.0}], 1e-2)
    opt_b = adamw([{"params": b[:1], "weight_decay": 0.01}, {"params": b[1:], "weight_decay": 0.0}], 1e-2, fused=False)
    assert opt_a.defaults["fused"] and not opt_b.defaults.get("fused")
    for _ in range(10):
        for params, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            (params[0].sin().sum() + (params[1] ** 2).sum()).backward()
            opt.step()
    for x, y in zip(a, b):
        assert not torch.equal(x, x.new_zeros(x.shape))
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["soft_prompt", "hard_prompt_tuned"])
def test_fused_norms_run_in_every_training_step(name, tiny, make_data, monkeypatch):
    """Under bf16-mixed the fp32 residual stream goes through the fused RMSNorm in every training step,
    after validation too: Lightning switches a tuned backbone to eval for validation, and transformers
    then gives its norms their class's forward back, which ``PromptModule.train`` undoes."""
    from prompt_methods import runtime

    calls = []
    fused = runtime._RMSNorm.forward

    def counted(ctx, *args):
        calls.append(1)
        return fused(ctx, *args)

    monkeypatch.setattr(runtime._RMSNorm, "forward", staticmethod(counted))
    backbone = tiny("llama")
    dm = make_data(backbone)
    cls, kwargs = METHODS[name]
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, **kwargs)
    per_step = []

    class Count(L.Callback):
        def on_train_batch_start(self, *args):
            calls.clear()

        def on_train_batch_end(self, *args):
            per_step.append(len(calls))

    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, val_check_interval=1, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[Count()])
    trainer.fit(model, datamodule=dm)
    assert len(per_step) == 3 and min(per_step) >= 5  # two norms per layer and the final one, each step


@pytest.mark.parametrize("name,pack", [("soft_prompt", True), ("soft_prompt", False), ("hard_prompt_tuned", True)])
def test_packed_linears_run_in_every_training_step(name, pack, tiny, make_data, monkeypatch):
    """Under bf16-mixed a frozen backbone's linear layers run on packed weights in every training step,
    after validation too (four products per Llama layer: queries with keys and values, the output
    projection, gate with up, down); ``pack_weights: false`` and a tuned backbone run none."""
    from prompt_methods import runtime

    if not runtime._pack_ops_available():
        pytest.skip("this torch has no oneDNN")
    calls = []
    packed = runtime._PackedLinear.forward

    def counted(ctx, x, group, mods):
        calls.append(x.dtype)
        return packed(ctx, x, group, mods)

    monkeypatch.setattr(runtime._PackedLinear, "forward", staticmethod(counted))
    backbone = tiny("llama")
    dm = make_data(backbone)
    cls, kwargs = METHODS[name]
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, pack_weights=pack, **kwargs)
    per_step = []

    class Count(L.Callback):
        def on_train_batch_start(self, *args):
            calls.clear()

        def on_train_batch_end(self, *args):
            per_step.append((len(calls), set(calls)))

    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=3, val_check_interval=1, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[Count()])
    trainer.fit(model, datamodule=dm)
    layers = model.backbone.config.num_hidden_layers
    assert len(per_step) == 3
    if pack and not model.tune_backbone:
        assert all(n >= 4 * layers and kinds == {torch.bfloat16} for n, kinds in per_step)
    else:
        assert all(n == 0 for n, _ in per_step)


def test_pack_weights_setting(tiny, make_data, monkeypatch):
    """``pack_weights``: a bad value names its key; ``auto`` packs where two copies of the frozen linear
    weights fit in a quarter of the available memory (or that is unknown); never off the CPU."""
    from torch import nn

    from prompt_methods import SoftPrompt, runtime

    dm = make_data(tiny("llama"))
    with pytest.raises(ValueError, match="model.init_args.pack_weights: 'yes'"):
        SoftPrompt(backbone=tiny("llama"), verbalizer=dm.verbalizer, pack_weights="yes")
    layer = nn.Linear(16, 16).requires_grad_(False)
    assert runtime.packed_bytes(layer) == 2 * 16 * 16 * 4
    for free, packs in ((4 * 2048, True), (4 * 2048 - 4, False), (None, True)):
        monkeypatch.setattr(runtime, "available_memory", lambda free=free: free)
        assert runtime.should_pack("auto", layer, "cpu") is packs
        assert runtime.should_pack(True, layer, "cpu") and not runtime.should_pack(False, layer, "cpu")
        assert not runtime.should_pack("auto", layer, "cuda") and not runtime.should_pack(True, layer, "cuda")
    assert runtime.packed_bytes(nn.Linear(16, 16)) == 0  # trained weights are not packed
    monkeypatch.undo()
    assert runtime.available_memory() is None or runtime.available_memory() > 0


def test_weights_pack_only_where_each_process_holds_them_whole(tiny, make_data):
    """One device and DDP replicas hold whole weights, which packing may copy; FSDP and DeepSpeed shard
    them and gather them for each forward, so their runs keep the plain matmuls."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    from prompt_methods import SoftPrompt

    dm = make_data(tiny("llama"))
    model = SoftPrompt(backbone=tiny("llama"), verbalizer=dm.verbalizer)
    assert model._whole_weights()  # no trainer: a module used on its own
    for strategy, whole in ((SingleDeviceStrategy(device="cpu"), True), (DDPStrategy(), True),
                            (FSDPStrategy(), False), (DeepSpeedStrategy.__new__(DeepSpeedStrategy), False)):
        model._trainer = SimpleNamespace(strategy=strategy)
        assert model._whole_weights() is whole, type(strategy).__name__
