"""Backbone resolution: aliases, folders, hub ids, kinds, and the errors users see."""

from __future__ import annotations

import pytest
import torch

from prompt_methods import HardPrompt, SoftPrompt
from prompt_methods.backbone import BackboneError, detect_kind, load_backbone, resolve


def test_unknown_alias_or_path_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="model.init_args.backbone: path './nope' does not exist"):
        resolve("./nope")
    with pytest.raises(BackboneError, match="'smollm-999' is not a known alias .*smollm2-135m"):
        load_backbone("smollm-999")


def test_folder_without_config(tmp_path):
    with pytest.raises(BackboneError, match="has no config.json"):
        resolve(str(tmp_path))


@pytest.mark.parametrize("arch,kind", [("llama", "causal"), ("gpt2", "causal"), ("bert", "mlm"), ("t5", "seq2seq")])
def test_kind_from_architecture(arch, kind, tiny):
    model, got = load_backbone(tiny(arch))
    assert got == kind == detect_kind(model.config)


def test_packaged_minilm_is_an_encoder_with_head_readout(make_data):
    model, kind = load_backbone("minilm-l6")
    assert kind == "encoder"
    dm = make_data("minilm-l6")
    module = SoftPrompt(backbone="minilm-l6", verbalizer=dm.verbalizer, num_virtual_tokens=4)
    scores = module(next(iter(dm.val_dataloader())))
    assert scores.shape == (6, 2)
    from prompt_methods.readout import ClassificationHead

    assert isinstance(module.readout, ClassificationHead) and not module.head_trained  # refused by test until fit


def test_label_words_on_encoder_without_lm_head(make_data):
    dm = make_data("minilm-l6")
    with pytest.raises(BackboneError, match="label_words needs a backbone with an LM head"):
        HardPrompt(backbone="minilm-l6", verbalizer=dm.verbalizer, readout="label_words")


def test_trust_remote_code_stays_off(tiny, make_data, monkeypatch):
    """Every config, tokenizer and model load of a method and its DataModule passes trust_remote_code=False
    unless it is set."""
    import transformers

    seen = []
    for cls in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        auto = getattr(transformers, cls)
        real = auto.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    dm = make_data(tiny("llama"))
    SoftPrompt(backbone=tiny("llama"), verbalizer=dm.verbalizer, num_virtual_tokens=2)
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(flag is False for _, flag in seen), seen


def test_cache_keyword_follows_the_transformers_release(tiny):
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``: prompts reach the
    backbone under whichever name its release takes, and the returned cache is read under either."""
    from torch import nn
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from prompt_methods.prompt_cache import cache_keyword, new_cache, output_cache

    class Before(nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None, **kwargs): ...

    class After(nn.Module):
        def forward(self, inputs_embeds=None, cache=None, use_cache=None, **kwargs): ...

    class Neither(nn.Module):
        def forward(self, inputs_embeds=None, **kwargs): ...

    assert cache_keyword(Before()) == "past_key_values"
    assert cache_keyword(After()) == "cache"
    assert cache_keyword(Neither()) is None
    model, kind = load_backbone(tiny("llama"))
    assert cache_keyword(model.base_model) in ("cache", "past_key_values")
    cache = new_cache(model, kind)
    assert output_cache({"last_hidden_state": None, "past_key_values": cache}) is cache  # an older release's output
    assert output_cache(BaseModelOutputWithPast(last_hidden_state=torch.zeros(1), **{cache_keyword(model.base_model): cache})) is cache
    assert output_cache(BaseModelOutputWithPast(last_hidden_state=torch.zeros(1))) is None
