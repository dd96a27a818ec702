"""PEFT adapter folders: a prompt trained here loads into PEFT with the same logits, and a PEFT
adapter loads here with the same logits (soft prompt, prefix, P-tuning), on a tiny Llama."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from prompt_methods import PrefixTuning, PTuning, SoftPrompt
from prompt_methods.peft_format import AdapterError, export_adapter
from prompt_methods.readout import base_forward

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

VERB = [[[5]], [[7]]]


def batch_of(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "soft_index": torch.full_like(ids, -1),
            "answer_pos": torch.full((ids.size(0),), ids.size(1) - 1)}


def our_logits(module, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the input's own positions (virtual positions dropped)."""
    with torch.no_grad():
        hidden = base_forward(module.backbone, module.feed(batch_of(ids))).last_hidden_state
        return module.backbone.get_output_embeddings()(hidden[:, -ids.size(1):]).float()


def peft_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.size(1):].float()


def trained(module, seed: int = 0):
    """Move every method parameter off its init, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("backbone."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


METHODS = [
    (SoftPrompt, {"num_virtual_tokens": 4, "init": "random"}, "PROMPT_TUNING"),
    (PrefixTuning, {"num_virtual_tokens": 3, "init": "random"}, "PREFIX_TUNING"),
    (PTuning, {"num_virtual_tokens": 4, "encoder": "lstm", "encoder_hidden": 16}, "P_TUNING"),
    (PTuning, {"num_virtual_tokens": 4, "encoder": "mlp", "encoder_hidden": 16}, "P_TUNING"),
]


@pytest.mark.parametrize("cls,kwargs,peft_type", METHODS)
def test_export_loads_in_peft_with_same_logits(cls, kwargs, peft_type, tiny, tmp_path):
    path = tiny("llama")
    ours = trained(cls(backbone=path, verbalizer=VERB, attn_implementation="eager", **kwargs))
    ours.backbone.set_attn_implementation("eager")
    out = export_adapter(ours, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["task_type"] == "CAUSAL_LM"
    assert config["num_virtual_tokens"] == kwargs["num_virtual_tokens"] and config["num_layers"] == 2
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.randint(3, 60, (2, 7))
    a, b = our_logits(ours, ids), peft_logits(theirs, ids)
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, diff


PEFT_CONFIGS = [
    (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), SoftPrompt),
    (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), PrefixTuning),
    (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16), SoftPrompt),
]


@pytest.mark.parametrize("make_config,cls", PEFT_CONFIGS)
def test_peft_adapter_loads_here_with_same_logits(make_config, cls, tiny, tmp_path):
    path = tiny("llama")
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager"), make_config())
    trained(model.prompt_encoder, seed=1)  # "trained" with PEFT
    model.save_pretrained(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager"),
                                            str(tmp_path / "peft")).eval()
    ours = cls(backbone=path, verbalizer=VERB, adapter=str(tmp_path / "peft")).eval()
    ours.backbone.set_attn_implementation("eager")
    ids = torch.randint(3, 60, (2, 6))
    diff = (our_logits(ours, ids) - peft_logits(theirs, ids)).abs().max().item()
    assert diff < 1e-4, diff


def test_export_refuses_slot_prompts_and_other_methods(tiny, tmp_path):
    from prompt_methods import FineTuning

    soft = SoftPrompt(backbone=tiny("llama"), verbalizer=VERB, num_virtual_tokens=2)
    with pytest.raises(AdapterError, match="data.init_args.template"):
        export_adapter(soft, tmp_path / "a", template="{soft:1} Review: {sentence} {soft:1} {mask}")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterError, match="no PEFT equivalent"):
        export_adapter(FineTuning(backbone=tiny("llama"), verbalizer=VERB), tmp_path / "b")


def test_adapter_errors_name_the_key(tiny, tmp_path):
    path = tiny("llama")
    with pytest.raises(AdapterError, match="model.init_args.adapter: .*adapter_config.json"):
        SoftPrompt(backbone=path, verbalizer=VERB, adapter=str(tmp_path))
    prefix = trained(PrefixTuning(backbone=path, verbalizer=VERB, num_virtual_tokens=2, init="random"))
    export_adapter(prefix, tmp_path / "prefix")
    with pytest.raises(AdapterError, match="PREFIX_TUNING; this method reads PROMPT_TUNING"):
        SoftPrompt(backbone=path, verbalizer=VERB, adapter=str(tmp_path / "prefix"))
    soft = trained(SoftPrompt(backbone=path, verbalizer=VERB, num_virtual_tokens=2, init="random"))
    export_adapter(soft, tmp_path / "soft")
    (tmp_path / "soft" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        SoftPrompt(backbone=path, verbalizer=VERB, adapter=str(tmp_path / "soft"))
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(2, soft.hidden_size + 1)}, str(tmp_path / "soft" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"shape \(2, 33\).*another backbone"):  # another backbone's width
        SoftPrompt(backbone=path, verbalizer=VERB, adapter=str(tmp_path / "soft"))


def test_peft_peer_starts_from_our_soft_prompt(tiny):
    """The benchmark's PEFT soft prompt starts from the prompt promptlit's SoftPrompt draws for the same
    seed (same vocabulary rows), so the pair differs in implementation only; same_init: false keeps
    PEFT's own draw."""
    from lightning.pytorch import seed_everything

    from prompt_methods.peft_peer import PeftPeer

    path = tiny("llama")
    start = {}
    for name, make in (("ours", lambda: SoftPrompt(backbone=path, verbalizer=VERB, num_virtual_tokens=5)),
                       ("peft", lambda: PeftPeer(backbone=path, verbalizer=VERB, num_virtual_tokens=5)),
                       ("peft_own", lambda: PeftPeer(backbone=path, verbalizer=VERB, num_virtual_tokens=5,
                                                     same_init=False)),
                       ("ours_7", lambda: SoftPrompt(backbone=path, verbalizer=VERB, num_virtual_tokens=5, init_seed=7)),
                       ("peft_7", lambda: PeftPeer(backbone=path, verbalizer=VERB, num_virtual_tokens=5, init_seed=7))):
        seed_everything(3)
        module = make()
        start[name] = (module.prompt if name.startswith("ours") else
                       module.peft_model.prompt_encoder["default"].embedding.weight).detach().float().clone()
    assert start["ours"].shape == (5, start["ours"].size(1))
    torch.testing.assert_close(start["peft"], start["ours"])
    torch.testing.assert_close(start["peft_7"], start["ours_7"])
    assert not torch.equal(start["ours_7"], start["ours"])
    assert not torch.equal(start["peft_own"], start["ours"])


def test_export_into_a_file_new_folder_or_earlier_export(tiny, tmp_path):
    """--out_dir that is a file is named; a new folder appears whole; a second export into the same
    folder replaces both files and keeps the user's other files; no staging folder is left behind."""
    path = tiny("llama")
    (tmp_path / "afile").write_text("x")
    soft = trained(SoftPrompt(backbone=path, verbalizer=VERB, num_virtual_tokens=2, init="random"))
    with pytest.raises(AdapterError, match=r"--out_dir: .*afile is a file, not a folder"):
        export_adapter(soft, tmp_path / "afile")
    old = os.umask(0o022)
    try:  # the folder and files get what a plain write would, not mkdtemp's/mkstemp's private modes
        out = export_adapter(soft, tmp_path / "nested" / "adapter")
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    (out / "NOTES.md").write_text("mine")
    other = trained(SoftPrompt(backbone=path, verbalizer=VERB, num_virtual_tokens=3, init="random"))
    export_adapter(other, out)
    assert (out / "NOTES.md").read_text() == "mine"
    back = SoftPrompt(backbone=path, verbalizer=VERB, adapter=str(out))
    torch.testing.assert_close(back.prompt.detach(), other.prompt.detach().float())
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["adapter"]  # no staging folder left


def test_peft_p_tuning_peer_builds_the_same_encoder(tiny):
    """PEFT's encoder_hidden_size is per LSTM direction: the peer must get half of promptlit's
    encoder_hidden, or its encoder is about three times as large (it was, in the recorded table)."""
    from prompt_methods import PTuning
    from prompt_methods.peft_peer import PeftPeer

    path = tiny("llama")
    ours = PTuning(backbone=path, verbalizer=VERB, num_virtual_tokens=4, encoder_hidden=16)
    peer = PeftPeer(backbone=path, verbalizer=VERB, peft_method="p_tuning", num_virtual_tokens=4, encoder_hidden=16)
    ours.configure_trainable()
    peer.configure_trainable()
    shapes = lambda m: sorted(tuple(p.shape) for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert shapes(peer) == shapes(ours)


def test_seq2seq_soft_prompt_export_loads_in_peft_on_the_encoder(tiny, tmp_path):
    """On T5 the prompt sits before the encoder's input only; the adapter says so (one transformer
    submodule), so PEFT loads it and gives the same logits (its seq2seq default, two, would look for a
    second prompt before the decoder's input, which was never trained, and refuse the tensor's size)."""
    from transformers import AutoModelForSeq2SeqLM

    path = tiny("t5")
    ours = trained(SoftPrompt(backbone=path, verbalizer=VERB, num_virtual_tokens=4, init="random"))
    out = export_adapter(ours, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["num_transformer_submodules"] == 1
    theirs = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(path), str(out)).eval()
    ids, dec = torch.randint(3, 60, (2, 7)), torch.randint(3, 60, (2, 3))
    with torch.no_grad():
        b = theirs(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
        feed = ours.feed(batch_of(ids))  # what promptlit hands the encoder
        a = ours.backbone(inputs_embeds=feed.inputs_embeds, attention_mask=feed.attention_mask,
                          decoder_input_ids=dec).logits
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, diff
