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


def test_label_words_on_encoder_without_lm_head(make_data):
    dm = make_data("minilm-l6")
    with pytest.raises(BackboneError, match="label_words needs a backbone with an LM head"):
        HardPrompt(backbone="minilm-l6", verbalizer=dm.verbalizer, readout="label_words")


def test_trust_remote_code_stays_off(tiny):
    from prompt_methods.base import PromptModule

    import inspect

    assert inspect.signature(PromptModule).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_backbone).parameters["trust_remote_code"].default is False
