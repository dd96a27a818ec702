"""Template language, verbalizers and truncation."""

from __future__ import annotations

import pytest

from datamodules.encoding import PieceTokenizer, TemplateTokenizer, answer_span, generation_target, tokenize_label_words
from datamodules.readers import DataError
from tasks.template import Field, Mask, Soft, Template, TemplateError, Text


def test_parse_pieces_and_spaces():
    t = Template.parse("{soft:2} Review: {sentence} {soft} It was {mask}. {{literal}}", ["sentence"])
    assert t.pieces == (Soft(2), Text(" Review:"), Field(" ", "sentence"), Soft(1), Text(" It was"), Mask(" "),
                        Text(". {literal}"))
    assert t.num_soft == 3 and t.fields == ["sentence"] and t.has_mask


@pytest.mark.parametrize("source,match", [
    ("{sentense} {mask}", "unknown placeholder '{sentense}'"),
    ("{sentence.__class__} {mask}", "unknown placeholder"),
    ("{sentence!r} {mask}", "unknown placeholder"),
    ("{0} {mask}", "unknown placeholder"),
    ("{sentence} {mask", "unbalanced"),
    ("{sentence} mask}", "unbalanced"),
    ("{soft:0} {sentence} {mask}", "positive count"),
    ("{soft:abc} {sentence} {mask}", "positive count"),
    ("   ", "empty"),
])
def test_broken_templates_name_the_key(source, match):
    with pytest.raises(TemplateError, match=match) as err:
        Template.parse(source, ["sentence"], key="data.init_args.template")
    assert str(err.value).startswith("data.init_args.template")


def test_template_is_never_evaluated():
    # format-string tricks stay inert text or errors; nothing is looked up on objects
    with pytest.raises(TemplateError, match=r"unknown placeholder '\{sentence\.__init__\.__globals__\}'"):
        Template.parse("{sentence.__init__.__globals__} {mask}", ["sentence"])


def test_answer_slot_required(make_data, tiny):
    with pytest.raises(TemplateError, match="exactly one {mask}"):
        make_data(tiny("llama"), template="Review: {sentence}")
    with pytest.raises(TemplateError, match="exactly one {mask}"):
        make_data(tiny("llama"), template="{mask} Review: {sentence} {mask}")


def test_causal_prompt_ends_before_answer(make_data, tiny):
    dm = make_data(tiny("llama"), template="Review: {sentence} It was {mask}. Really.")
    enc = dm.encoder.encode({"sentence": "a great movie"})
    text = dm.tokenizer.decode(enc.input_ids)
    assert text.endswith("It was") and "Really" not in text
    assert enc.answer_pos == len(enc.input_ids) - 1


def test_causal_template_refuses_input_after_the_answer(tiny):
    """A causal LM never sees what follows {mask}: trailing text may go, a field or slot there is an error
    (a masked LM keeps them)."""
    from transformers import AutoTokenizer

    causal, mlm = AutoTokenizer.from_pretrained(tiny("llama")), AutoTokenizer.from_pretrained(tiny("bert"))
    for source, lost in [("It was {mask}. {sentence}", "{sentence}"), ("{sentence} It was {mask} {soft:3}", "{soft:3}"),
                         ("It was {mask}: {soft:2} {sentence}", "{soft:2}, {sentence}")]:
        template = Template.parse(source, ["sentence"])
        with pytest.raises(TemplateError, match=f"data.init_args.template: {lost} after {{mask}}.*move"):
            TemplateTokenizer(causal, template, "causal", max_length=64)
        TemplateTokenizer(mlm, template, "mlm", max_length=64)
    TemplateTokenizer(causal, Template.parse("{sentence} It was {mask}. Really.", ["sentence"]), "causal", max_length=64)


def test_mlm_mask_slots_match_longest_word(make_data, tiny):
    dm = make_data(tiny("bert"), label_words={"0": ["terrible", "bad"], "1": "wonderful"})
    longest = max(len(w) for words in dm.verbalizer for w in words)
    enc = dm.encoder.encode({"sentence": "a great movie"})
    mask_id = dm.tokenizer.mask_token_id
    assert enc.input_ids.count(mask_id) == longest
    assert enc.input_ids[enc.answer_pos] == mask_id


def test_multi_word_and_multi_token_verbalizer(make_data, tiny):
    dm = make_data(tiny("llama"), label_words={"0": ["terrible", "bad"], "1": ["great", "wonderful"]})
    assert [len(words) for words in dm.verbalizer] == [2, 2]
    assert any(len(w) > 1 for words in dm.verbalizer for w in words)  # tiny BPE splits these words
    # label words are tokenized with the space the template puts before {mask}
    assert dm.verbalizer[1][0] == dm.tokenizer(" great", add_special_tokens=False)["input_ids"]


def test_unknown_label_in_data_is_named(tmp_path, make_data, tiny):
    bad = tmp_path / "train.tsv"
    bad.write_text("sentence\tlabel\ngood movie\t1\nodd one\tmaybe\n")
    dm_args = dict(train_file=str(bad))
    with pytest.raises(DataError, match="label 'maybe' is not in data.init_args.label_words"):
        make_data(tiny("llama"), **dm_args)


def test_label_without_words(make_data, tiny):
    with pytest.raises(DataError, match="no words for label"):
        make_data(tiny("llama"), label_words={"0": ["bad"]})


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_truncation_cuts_only_fields(make_data, tiny, arch):
    dm = make_data(tiny(arch), template="{soft:2} Review: {sentence} Sentiment: {mask}", max_length=24)
    long = " ".join(["great movie"] * 50)
    enc = dm.encoder.encode({"sentence": long})
    assert len(enc.input_ids) == 24
    text = dm.tokenizer.decode(enc.input_ids)
    assert "Review" in text and "Sentiment" in text
    assert sum(i >= 0 for i in enc.soft_index) == 2
    if arch != "llama":
        assert dm.tokenizer.mask_token in text or "<extra_id_0>" in text
    short = dm.encoder.encode({"sentence": "great"})
    assert len(short.input_ids) < 24  # short inputs are not padded or cut


def test_truncation_longest_field_first(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny("llama"))
    t = Template.parse("{a} and {b} ? {mask}", ["a", "b"])
    enc = TemplateTokenizer(tok, t, "causal", max_length=20)
    fields, _ = enc.encode_fields({"a": "great " * 40, "b": "bad"})
    assert len(fields[2]) == len(tok(" bad", add_special_tokens=False)["input_ids"])  # piece 2 is {b}
    assert sum(map(len, fields.values())) == enc.budget


def test_repeated_field_counts_against_the_budget(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny("llama"))
    t = Template.parse("{a} means {b}, so {a} is {mask}", ["a", "b"])
    enc = TemplateTokenizer(tok, t, "causal", max_length=30)
    out = enc.encode({"a": "great " * 40, "b": "bad"})
    assert len(out.input_ids) == 30


def test_template_longer_than_max_length(make_data, tiny):
    with pytest.raises(TemplateError, match="data.init_args.max_length=4 is shorter than the template"):
        make_data(tiny("llama"), max_length=4)


def test_empty_and_whitespace_text(make_data, tiny):
    dm = make_data(tiny("llama"))
    for text in ("", "   ", None):
        enc = dm.encoder.encode({"sentence": text})
        assert dm.tokenizer.decode(enc.input_ids).strip().startswith("Review:")


def test_tokenizer_without_pad_token(tmp_path, tiny, make_data):
    from transformers import AutoTokenizer

    src = tiny("gpt2")
    tok = AutoTokenizer.from_pretrained(src)
    import shutil

    dst = tmp_path / "nopad"
    shutil.copytree(src, dst)
    tok.pad_token = None
    tok.save_pretrained(dst)
    dm = make_data(str(dst))
    batch = next(iter(dm.train_dataloader()))
    assert dm.tokenizer.pad_token_id is not None
    assert batch["input_ids"].shape[0] == 6


PROMPTS = [  # template, row: pieces that follow text with and without a space, a line break, a field first
    ("{passage} Question: {question}? Answer: {mask}", {"passage": "the film was great.", "question": "was it good"}),
    ("Review: {sentence} Sentiment: {mask}", {"sentence": "a great movie, fine acting"}),
    ("Question: {question}\nAnswer type:{mask}", {"question": "Who wrote the book?"}),
]


def tokenizers_by_name(name, tiny, sentencepiece_tokenizer):
    from transformers import AutoTokenizer

    return sentencepiece_tokenizer if name == "sentencepiece" else AutoTokenizer.from_pretrained(tiny(name))


@pytest.mark.parametrize("name", ["llama", "sentencepiece"])  # byte-level BPE; a tokenizer that marks word starts
@pytest.mark.parametrize("source,row", PROMPTS)
def test_pieces_tokenize_as_the_whole_prompt(name, source, row, tiny, sentencepiece_tokenizer):
    """A prompt tokenized piece by piece, its label words and its answer equal the tokens of the whole
    text: a SentencePiece-style tokenizer would give "? Answer:" alone a stray word-start token."""
    tok = tokenizers_by_name(name, tiny, sentencepiece_tokenizer)
    template = Template.parse(source, list(row))
    enc = TemplateTokenizer(tok, template, "causal", max_length=128)
    prompt = source.split("{mask}")[0].rstrip(" ").format(**row)
    space = TemplateTokenizer.mask_space(template)
    whole = tok(prompt, add_special_tokens=False)["input_ids"]
    assert enc.encode(row).input_ids == enc.prefix + whole
    words = {"0": ["positive"], "1": ["great movie"]}
    for (word,), ids in zip(words.values(), tokenize_label_words(tok, template, ["0", "1"], words)):
        assert whole + ids[0] == tok(prompt + space + word, add_special_tokens=False)["input_ids"]
    target = generation_target(tok, "the acting", space, max_tokens=16)
    assert whole + target[:-1] == tok(prompt + space + "the acting", add_special_tokens=False)["input_ids"]


def test_only_word_start_tokenizers_tokenize_pieces_after_an_anchor(tiny, sentencepiece_tokenizer):
    from transformers import AutoTokenizer

    assert PieceTokenizer(sentencepiece_tokenizer).anchored
    assert sentencepiece_tokenizer.convert_ids_to_tokens(PieceTokenizer(sentencepiece_tokenizer).plain("?"))[0] == "▁"
    for arch in ("llama", "bert"):  # byte-level BPE and WordPiece tokenize a piece alone as inside a text
        assert not PieceTokenizer(AutoTokenizer.from_pretrained(tiny(arch))).anchored


@pytest.mark.parametrize("context", ["  the film was great, the acting fine.", "the film was great, the acting fine."])
def test_span_offsets_with_a_word_start_tokenizer(context, sentencepiece_tokenizer):
    """Character offsets of a field tokenized after the anchor still point into the field's own text,
    from its first character (a word-start token's span covers the space the template puts before it)."""
    template = Template.parse("Question: {question} Context: {context} Answer: {mask}", ["question", "context"])
    enc = TemplateTokenizer(sentencepiece_tokenizer, template, "causal", max_length=128)
    at = context.index("great")
    row = {"question": "How was it?", "context": context, "answers": ["great"], "answer_starts": [at]}
    encoded = enc.encode(row, offsets_field="context")
    start, end = answer_span(encoded, row, "context")["span"]
    assert context[encoded.offsets[start][0]:encoded.offsets[end][1]].strip() == "great"
    assert sentencepiece_tokenizer.decode(encoded.input_ids[start:end + 1]).strip() == "great"
    first = min(encoded.offsets)  # the context's first token, "▁the"
    assert encoded.offsets[first][0] >= 0 and context[slice(*encoded.offsets[first])].strip() == "the"


def test_text_after_leading_soft_slots_starts_the_text(sentencepiece_tokenizer):
    """{soft} slots are not text: a field right after them is tokenized as the start of a text, as the
    PEFT peer's template without the slots has it."""
    tok = sentencepiece_tokenizer
    template = Template.parse("{soft:3}{sentence} Sentiment: {mask}", ["sentence"])
    enc = TemplateTokenizer(tok, template, "causal", max_length=64)
    ids = enc.encode({"sentence": "great movie"}).input_ids
    assert ids[len(enc.prefix) + 3:] == tok("great movie Sentiment:", add_special_tokens=False)["input_ids"]


def test_a_piece_that_merges_into_the_letter_anchor_takes_the_next(sentencepiece_tokenizer):
    pieces = PieceTokenizer(sentencepiece_tokenizer)
    tok = sentencepiece_tokenizer
    assert tok("a" + "nd the", add_special_tokens=False)["input_ids"][:1] != tok("a", add_special_tokens=False)["input_ids"]
    ids = pieces("nd the")
    assert tok.convert_ids_to_tokens(ids)[0] != "▁" and not tok.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert tok.decode(ids) == "nd the"


def test_seq2seq_answers_start_a_text_and_pieces_after_the_sentinel_do_not(sentencepiece_tokenizer):
    """A seq2seq label word or answer starts the decoder's text (a word start, as T5 wrote the spans it
    was trained to fill); template text right after the input's sentinel continues the text."""
    from conftest import _sentencepiece_style_tokenizer

    tok = _sentencepiece_style_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<extra_id_0>", "<extra_id_1>"]})
    template = Template.parse("{sentence} It was {mask}.", ["sentence"])
    words = tokenize_label_words(tok, template, ["0"], {"0": ["positive"]}, kind="seq2seq")
    assert tok.convert_ids_to_tokens(words[0][0])[0].startswith("▁")
    assert generation_target(tok, "great", "", 16, kind="seq2seq")[1:-2] == tok("great", add_special_tokens=False)["input_ids"]
    ids = TemplateTokenizer(tok, template, "seq2seq", max_length=64).encode({"sentence": "a fine film"}).input_ids
    sentinel = ids.index(tok.convert_tokens_to_ids("<extra_id_0>"))
    assert tok.convert_ids_to_tokens(ids[sentinel + 1:]) == ["."]  # no word-start mark before the period
