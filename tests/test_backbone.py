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


@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_stays_off(flag, tiny, make_data, monkeypatch):
    """Every config, tokenizer and model load of a method and its DataModule passes trust_remote_code=False
    unless it is set, and the setting when it is."""
    import transformers

    seen = []
    for cls in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        auto = getattr(transformers, cls)
        real = auto.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    dm = make_data(tiny("llama"), trust_remote_code=flag)
    SoftPrompt(backbone=tiny("llama"), verbalizer=dm.verbalizer, num_virtual_tokens=2, trust_remote_code=flag)
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(given is flag for _, given in seen), seen


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


def _save(model, tok, path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_roberta_positions_start_after_the_padding_row(tmp_path):
    """RoBERTa-style embeddings number tokens from padding_idx + 1: given no position ids the model
    does so itself, and the positions promptlit passes (skipping left padding) must agree."""
    from conftest import _bpe_tokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM

    from prompt_methods.readout import base_forward

    torch.manual_seed(0)
    tok = _bpe_tokenizer()
    cfg = RobertaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=20, initializer_range=0.2)
    path = _save(RobertaForMaskedLM(cfg), tok, tmp_path / "roberta")
    model = HardPrompt(backbone=path, verbalizer=[[[5]], [[7]]]).eval()
    ids = torch.randint(10, 60, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "soft_index": torch.full_like(ids, -1),
             "answer_pos": torch.full((2,), 3)}
    with torch.no_grad():
        feed = model.feed(batch)
        ours = base_forward(model.backbone, feed).last_hidden_state
        theirs = model.backbone.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert feed.position_ids[0].tolist() == list(range(tok.pad_token_id + 1, tok.pad_token_id + 7))
    torch.testing.assert_close(ours, theirs)
    long = torch.randint(10, 60, (1, 20 - tok.pad_token_id))  # one position more than the table holds
    batch = {"input_ids": long, "attention_mask": torch.ones_like(long), "soft_index": torch.full_like(long, -1),
             "answer_pos": torch.tensor([3])}
    with pytest.raises(ValueError, match=f"more than the {20 - tok.pad_token_id - 1} this backbone"):
        model(batch)


def test_encoder_prefix_positions_follow_the_prefix_as_transformers_numbers_them(tmp_path):
    """On an encoder the tokens after a P-long prefix sit at positions P.., as BERT numbers them after
    a cache of length P (and PEFT's and P-tuning v2's prefix adapters were trained so)."""
    from conftest import _wordpiece_tokenizer
    from transformers import BertConfig, BertModel, DynamicCache

    from prompt_methods import PrefixTuning
    from prompt_methods.prompt_cache import cache_keyword
    from prompt_methods.readout import base_forward

    torch.manual_seed(0)
    tok = _wordpiece_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=24)
    path = _save(BertModel(cfg), tok, tmp_path / "bert")
    model = PrefixTuning(backbone=path, verbalizer=[[[5]], [[7]]], readout="head", num_virtual_tokens=10, init="random").eval()
    ids = torch.randint(10, 60, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "soft_index": torch.full_like(ids, -1),
             "answer_pos": torch.zeros(2, dtype=torch.long)}
    with torch.no_grad():
        feed = model.feed(batch)
        ours = base_forward(model.backbone, feed).last_hidden_state
        cache = model.build_cache(2, torch.float32)
        assert isinstance(cache, DynamicCache)
        theirs = model.backbone(input_ids=ids, attention_mask=torch.ones(2, 22, dtype=torch.long),
                                **{cache_keyword(model.backbone.base_model): cache}).last_hidden_state  # positions after the cache
    assert feed.position_ids[0].tolist() == list(range(10, 22))
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("readout", ["head", "span"])
def test_a_head_readout_leaves_no_trainable_weight_without_a_gradient(readout, tmp_path, tiny):
    """DDP (find_unused_parameters=False) stops at the second step on a trainable weight that got no
    gradient: an encoder's pooler under a head on the hidden states, a masked LM's head under a span head."""
    from conftest import _wordpiece_tokenizer
    from transformers import BertConfig, BertModel

    from prompt_methods import FineTuning

    tok = _wordpiece_tokenizer()
    if readout == "head":
        cfg = BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
        model = FineTuning(backbone=_save(BertModel(cfg), tok, tmp_path / "bert"), verbalizer=[[[5]], [[7]]])
        assert model.backbone.base_model.pooler is not None
        batch_extra = {"labels": torch.tensor([0, 1])}
    else:
        model = FineTuning(backbone=tiny("bert"), verbalizer=[[[5]]], readout="span")
        batch_extra = {"span_start": torch.tensor([1, 2]), "span_end": torch.tensor([2, 3]),
                       "context_mask": torch.ones(2, 6, dtype=torch.bool)}
    model.configure_trainable()
    ids = torch.randint(10, 60, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "soft_index": torch.full_like(ids, -1),
             "answer_pos": torch.zeros(2, dtype=torch.long), **batch_extra}
    model.loss(batch)[0].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert any(p.requires_grad for p in model.backbone.base_model.encoder.parameters())  # the backbone still tunes


def test_converted_gguf_is_keyed_by_content_not_path_or_mtime(tmp_path):
    """A reinstalled package (same file, new path and modification time) reuses the converted folder;
    a different file does not."""
    import os

    from prompt_methods.backbone import _content_digest

    data = os.urandom(3 << 20)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(data)
    b.write_bytes(data)
    os.utime(b, ns=(1, 1))

    def key(path):
        st = path.stat()
        return _content_digest(str(path), st.st_size, st.st_mtime_ns)

    assert key(a) == key(b)
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit in the last MiB
    assert key(a) != key(b)


@pytest.mark.parametrize("arch", ["distilbert", "electra"])
def test_masked_lm_head_split_over_several_modules(arch):
    """DistilBERT's head is four top-level modules, ELECTRA's generator head two: applied in order
    to the base model's hidden states they give the model's own logits."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM, ElectraConfig, ElectraForMaskedLM

    from prompt_methods.readout import mlm_head

    torch.manual_seed(0)
    if arch == "distilbert":
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=16, hidden_dim=32, n_layers=1, n_heads=2))
    else:
        model = ElectraForMaskedLM(ElectraConfig(vocab_size=50, embedding_size=8, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2))
    model.eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(mlm_head(model)(hidden), model(input_ids=ids).logits)


def test_masked_lm_without_a_head_promptlit_knows_is_refused_at_build():
    """An MLM whose head promptlit cannot find is an error naming the readout key when the module is
    built, not a failure at the first batch."""
    from torch import nn
    from transformers import BertConfig, BertForMaskedLM

    from prompt_methods.readout import build_readout

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2))
    model.extra_head = nn.Linear(16, 50)  # a second head beside ``cls``
    with pytest.raises(ValueError, match=r"model.init_args.readout: label_words needs the masked-LM head of "
                                         r"BertForMaskedLM, .*\(bert, cls, extra_head\); use readout: head"):
        build_readout("label_words", "mlm", model, [[[5]], [[6]]], False, {})
