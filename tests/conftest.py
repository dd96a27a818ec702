"""Tiny random backbones built from configs, with tiny tokenizers trained on the spot: no downloads."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import (
    BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration,
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA_DIR = os.environ.get("PROMPTLIT_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

CORPUS = [
    "Review: a great movie with fine acting. Sentiment: positive",
    "Review: a terrible boring film, awful plot. Sentiment: negative",
    "Question: Who wrote the book? Answer type: person location number description entity abbreviation",
    "Article: the team won the match. Topic: sports world politics business technology science",
    "it was good bad great wonderful dull neutral very really not the a of and to in is",
    "sentiment review question answer article topic text sentence premise hypothesis",
]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>", "<extra_id_0>", "[CLS]", "[SEP]"]


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", mask_token="<mask>")


def _wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS * 20, trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="<mask>")


def _t5_tokenizer() -> PreTrainedTokenizerFast:
    tok = _bpe_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.eos_token_id)])
    tok.add_special_tokens({"additional_special_tokens": ["<extra_id_0>", "<extra_id_1>"]})  # the sentinels that frame an answer
    return tok


def _sentencepiece_style_tokenizer():
    """A Llama-2/Mistral-style tokenizer: transformers' ``LlamaTokenizer`` (a Metaspace pre-tokenizer that
    marks the start of each text with ``▁``, byte fallback) over a BPE vocabulary trained on the spot."""
    import json

    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", "<pad>", *byte_tokens]))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, pad_token="<pad>")


@pytest.fixture
def two_threads():
    """Run the test on two intra-op threads (as on a 2-core CI machine), whatever torch chose, so that
    a kernel that sums in thread order shows it; the setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_line_errors(monkeypatch):
    """Tests expect the one-line errors, whatever the shell exports."""
    monkeypatch.delenv("PROMPTLIT_TRACEBACK", raising=False)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return _sentencepiece_style_tokenizer()


def build_tiny(kind: str, path) -> str:
    torch.manual_seed(0)
    tok = _wordpiece_tokenizer() if kind == "bert" else _t5_tokenizer() if kind == "t5" else _bpe_tokenizer()
    V = len(tok)
    common = dict(vocab_size=V, pad_token_id=tok.pad_token_id, initializer_range=0.2)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=tok.bos_token_id,
                                           eos_token_id=tok.eos_token_id, **common))
    elif kind == "bert":
        model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                           max_position_embeddings=256, **common))
    elif kind == "t5":
        model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                                    decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **common))
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny("llama")`` -> folder of a tiny random model of that architecture (built once per session)."""
    built = {}

    def get(kind: str) -> str:
        if kind not in built:
            built[kind] = build_tiny(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return built[kind]

    return get


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not os.path.isdir(DATA_DIR):
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR


TRAIN_ROWS = [("a great movie with fine acting", "1"), ("a terrible boring film", "0"), ("wonderful and great", "1"),
              ("awful plot and dull", "0"), ("really good", "1"), ("not good , very bad", "0")]


@pytest.fixture(scope="session")
def sst_files(tmp_path_factory):
    """A tiny SST-2-shaped dataset: train/validation/test tsv files."""
    folder = tmp_path_factory.mktemp("sst")
    for split in ("train", "validation", "test"):
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in TRAIN_ROWS]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def make_data(sst_files):
    """``make_data(backbone, **overrides)`` -> a set-up ClassificationDataModule on the tiny SST files."""
    from datamodules import ClassificationDataModule

    def make(backbone: str, **kwargs):
        args = dict(task="sst2", backbone=backbone, train_file=str(sst_files / "train.tsv"),
                    validation_file=str(sst_files / "validation.tsv"), test_file=str(sst_files / "test.tsv"),
                    batch_size=6, eval_batch_size=6, max_length=64)
        args.update(kwargs)
        dm = ClassificationDataModule(**args)
        dm.setup()
        return dm

    return make


@pytest.fixture(scope="session")
def family_files(sst_files, tmp_path_factory):
    """Tiny train/validation/test files per task: SST-2 shaped tsv, relation, BoolQ, TREC and RTE jsonl."""
    import json

    folder = tmp_path_factory.mktemp("families")
    rel = [{"sentence": "The <e1>child</e1> was put in the <e2>cradle</e2> .", "label": "Content-Container(e1,e2)"},
           {"sentence": "The <e1>storm</e1> caused the <e2>flood</e2> .", "label": "Cause-Effect(e1,e2)"},
           {"sentence": "A <e1>book</e1> about the <e2>war</e2> .", "label": "Message-Topic(e1,e2)"}] * 2
    fewrel = [{**r, "label": pid} for r, pid in zip(rel, ["P177", "P361", "P26", "P177", "P361", "P26"])]
    boolq = [{"question": "is the sky blue", "passage": "The sky is blue on a clear day.", "label": "True"},
             {"question": "is fire cold", "passage": "Fire is hot.", "label": "False"}] * 3
    out = {"sst2": {s: str(sst_files / f"{s}.tsv") for s in ("train", "validation", "test")}}
    trec = [{"question": "Who wrote the book ?", "label": "HUM"}, {"question": "Where is the city ?", "label": "LOC"},
            {"question": "How many films were made ?", "label": "NUM"}] * 2
    rte = [{"premise": "The cat sat on the mat.", "hypothesis": "A cat is on the mat.", "label": "entailment"},
           {"premise": "The shop closed in 1990.", "hypothesis": "The shop is open.", "label": "not_entailment"}] * 3
    for task, rows in (("semeval", rel), ("fewrel", fewrel), ("boolq", boolq), ("trec", trec), ("rte", rte)):
        path = folder / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[task] = {s: str(path) for s in ("train", "validation", "test")}
    squad_path = folder / "squad.json"
    squad_path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{
        "context": "The film was great and the acting was wonderful.",
        "qas": [{"id": f"q{i}", "question": "How was the film?", "answers": [{"text": "great", "answer_start": 13}]}
                for i in range(6)]}]}]}))
    out["squad"] = {s: str(squad_path) for s in ("train", "validation", "test")}
    out["agnews"] = None  # run on the SST-2 files with task sst2 (same family, same reader path)
    return out
