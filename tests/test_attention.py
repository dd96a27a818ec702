"""The ``grouped`` attention kernel: the math of each model's eager attention, and chosen by ``auto``
for decoder-only backbones on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prompt_methods import attention, runtime
from test_methods import METHODS, assert_same_training, loss_scores_grads
from test_question_answering import greedy_without_cache, make_qa, squad_file  # noqa: F401 (fixture)


@pytest.fixture
def no_fallback(monkeypatch):
    """The ``grouped`` kernel must run itself: a hand-over to the model's eager attention fails the test
    (else a comparison with eager would compare eager with itself)."""
    monkeypatch.setattr(attention, "_eager", lambda module: pytest.fail(f"{type(module).__name__} fell back to eager"))


def load(path: str, impl: str, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.set_attn_implementation(impl)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # grouped-query heads (4 over 2) and plain heads
def test_grouped_equals_eager_with_padding(arch, tiny, no_fallback):
    """Logits and the input gradient of a left-padded batch equal eager attention's."""
    ids = torch.randint(5, 60, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    results = []
    for impl in ("eager", attention.NAME):
        model = load(tiny(arch), impl)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        (logits[:, -1].logsumexp(-1).sum() + logits[mask.bool()].square().mean()).backward()
        results.append((logits.detach(), embeds.grad))
    (eager_logits, eager_grad), (logits, grad) = results
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, eager_grad, atol=1e-5, rtol=1e-4)


def test_grouped_close_to_eager_in_bf16(tiny, no_fallback):
    """In bf16 the softmax runs in bf16 (fp32 inside the kernel, one rounding), eager's in fp32:
    against the fp32 model, grouped's bf16 logits are no further off than eager's bf16 logits."""
    torch.manual_seed(0)
    ids = torch.randint(5, 60, (4, 24))
    exact = load(tiny("llama"), "eager")(ids).logits
    eager = load(tiny("llama"), "eager", torch.bfloat16)(ids).logits.float()
    grouped = load(tiny("llama"), attention.NAME, torch.bfloat16)(ids).logits.float()
    assert (grouped - exact).abs().mean() <= 1.1 * (eager - exact).abs().mean()


@pytest.mark.parametrize("name", ["soft_prompt", "prefix_tuning", "p_tuning"])
def test_prompt_methods_train_the_same_with_grouped_attention(name, tiny, make_data, no_fallback):
    """Scores, loss and the prompt's gradient equal eager attention's, with the shared prompt row
    (soft prompt), a prefix cache (prefix tuning) and template slots (P-tuning)."""
    cls, kwargs = METHODS[name]
    backbone = tiny("llama")
    dm = make_data(backbone, label_words={"0": ["terrible", "bad movie"], "1": ["wonderful", "great"]})
    batch = next(iter(dm.train_dataloader()))
    results = []
    for impl in ("eager", attention.NAME):
        torch.manual_seed(0)
        model = cls(backbone=backbone, verbalizer=dm.verbalizer, attn_implementation=impl,
                    **{**kwargs, "num_virtual_tokens": 16})
        model.setup("fit")  # applies attn_implementation
        assert model.backbone.config._attn_implementation == impl
        results.append(loss_scores_grads(model, batch))
    assert_same_training(*results)


def test_generation_with_grouped_attention(tiny, squad_file, no_fallback):  # noqa: F811
    """Cached greedy decoding (one query against a growing cache) equals rerunning the whole prompt."""
    cls, kwargs = METHODS["soft_prompt"]
    dm = make_qa(tiny("llama"), squad_file)
    model = cls(backbone=tiny("llama"), verbalizer=dm.verbalizer, max_new_tokens=4, attn_implementation=attention.NAME,
                **kwargs)
    model.setup("test")
    model.eval()
    model.readout.eos_id, model.readout.line_ends = -1, False
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        assert model.readout.generate(model.backbone, model.feed(batch)) == greedy_without_cache(model, batch, 4)


def test_grouped_hands_unsupported_layers_to_eager(monkeypatch):
    """Attention dropout while training, soft-capping, a position bias, a boolean mask or no scaling:
    the model's own eager attention runs instead; keywords eager ignores too do not send it there."""
    calls = []
    monkeypatch.setattr(attention, "_eager", lambda module: lambda *a, **k: calls.append(k) or "eager")
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    mask = torch.zeros(1, 1, 3, 3)

    class Layer(torch.nn.Module):
        pass

    layer = Layer().train()
    out, _ = attention.grouped_attention(layer, q, k, k, mask, scaling=0.3)
    assert out.shape == (1, 3, 4, 8) and not calls
    assert attention.grouped_attention(layer, q, k, k, mask, scaling=0.3, dropout=0.1) == "eager"
    assert attention.grouped_attention(layer, q, k, k, mask, scaling=0.3, softcap=30.0) == "eager"
    assert attention.grouped_attention(layer, q, k, k, mask, scaling=0.3, position_bias=mask) == "eager"
    assert attention.grouped_attention(layer, q, k, k, mask.bool(), scaling=0.3) == "eager"
    assert attention.grouped_attention(layer, q, k, k, mask) == "eager"
    assert len(calls) == 5
    layer.eval()
    attention.grouped_attention(layer, q, k, k, mask, scaling=0.3, dropout=0.1)  # no dropout at eval
    attention.grouped_attention(layer, q, k, k, mask, scaling=0.3, position_ids=None, sliding_window=4, softcap=None)
    assert len(calls) == 5


def test_auto_attention_per_device_and_backbone(tiny, make_data):
    assert runtime.attention("auto", "cpu", "causal") == attention.NAME
    assert runtime.attention("auto", "cpu", "masked") == "eager"
    assert runtime.attention("auto", "cuda", "causal") == "sdpa"
    assert runtime.attention("eager", "cpu", "causal") == "eager"
    cls, kwargs = METHODS["soft_prompt"]
    for arch, expected in (("llama", attention.NAME), ("bert", "eager")):
        model = cls(backbone=tiny(arch), verbalizer=make_data(tiny(arch)).verbalizer, **kwargs)
        model.setup("fit")
        assert model.backbone.config._attn_implementation == expected


def test_grouped_value_heads_of_another_size():
    """Values whose head size differs from the queries' (as in DeepSeek-style attention): the
    output has the values' head size and equals attention with the key/value heads repeated."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 4)
    mask = torch.zeros(2, 1, 3, 5)
    mask[0, :, :, :2] = torch.finfo(torch.float32).min
    out, _ = attention.grouped_attention(torch.nn.Module(), q, k, v, mask, scaling=0.35)
    probs = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(2, 3) * 0.35 + mask, -1)
    assert out.shape == (2, 3, 4, 4) and out.is_contiguous()
    torch.testing.assert_close(out, (probs @ v.repeat_interleave(2, 1)).transpose(1, 2))


def test_gpt2_upcast_layers_keep_their_fp32_attention(tiny, tmp_path):
    """A GPT-2 config with ``reorder_and_upcast_attn``: under ``grouped`` its bf16 logits are the
    ones eager gives (the layer's own fp32 routine), not those of a bf16 softmax."""
    model = AutoModelForCausalLM.from_pretrained(tiny("gpt2"))
    model.config.reorder_and_upcast_attn = True
    model.save_pretrained(tmp_path)
    ids = torch.randint(5, 60, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    eager, grouped, plain = (load(str(tmp_path), impl, torch.bfloat16)(ids, attention_mask=mask).logits
                             for impl in ("eager", attention.NAME, "sdpa"))
    torch.testing.assert_close(grouped, eager, atol=0, rtol=0)
    assert not torch.equal(plain, eager)  # the upcast routine makes a difference in bf16


def test_grouped_under_autocast_takes_fp32_queries_and_mask():
    """An fp32 residual stream hands the kernel fp32 queries/keys (rotary embeddings in fp32) and an
    fp32 mask under autocast: it casts them to bf16 as autocast's matmuls would, so the scores and
    softmax stay bf16, and fp32's mask minimum must not round to -inf (a fully masked padding row
    would turn to NaN and spread through the values). Same output as bf16 inputs with a bf16 mask."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.zeros(2, 1, 5, 5)
    mask[0, :, :, :2] = torch.finfo(torch.float32).min  # row 0: two padding keys
    mask[0, :, 0] = torch.finfo(torch.float32).min  # and a query that sees nothing (left padding)
    bf16_mask = torch.where(mask < 0, torch.finfo(torch.bfloat16).min, 0.0).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, probs = attention.grouped_attention(torch.nn.Module(), q, k, v, mask, scaling=0.35)
        ref, _ = attention.grouped_attention(torch.nn.Module(), q.bfloat16(), k.bfloat16(), v.bfloat16(), bf16_mask,
                                             scaling=0.35)
    assert probs.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
