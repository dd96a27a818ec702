"""Backbone resolution: aliases, folders, hub ids, kinds, and the errors users see."""

from __future__ import annotations

import pytest

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
