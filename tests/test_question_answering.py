"""Question answering: SQuAD split and metric, generation with every method, BoolQ via the verbalizer."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.readers import read_split
from prompt_methods import SoftPrompt
from prompt_methods.readout import base_forward
from tasks.metrics import normalize_answer, squad
from tasks.spec import load_task
from test_methods import METHODS


def test_squad_split_by_article(data_dir):
    spec = load_task("squad")
    rows = {s: read_split(spec.splits[s], data_dir, s, ["context", "question", "answers"]) for s in spec.splits}
    assert sum(len(r) for r in rows.values()) == 10570
    titles = {s: {r["title"] for r in rs} for s, rs in rows.items()}
    assert (len(titles["train"]), len(titles["validation"]), len(titles["test"])) == (33, 5, 10)
    assert not (titles["train"] & titles["test"] or titles["train"] & titles["validation"] or titles["validation"] & titles["test"])


def test_squad_shaped_user_file_without_ids_or_answer_starts(tmp_path):
    """Generative QA needs no answer_start: a user's SQuAD-shaped file may leave it (and ids) out; a
    row lacking what every reader needs is named, not a KeyError."""
    from datamodules.readers import DataError
    from tasks.spec import SplitSource

    context = "Paris is the capital of France."
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"question": "Capital of?", "answers": [{"text": "France"}]},
        {"id": "x", "question": "Which city?", "answers": [{"text": "Paris", "answer_start": 0}, {"text": "Rome"}]}]}]}]}))
    rows = read_split(SplitSource(file=str(path)), "", "test", ["context", "question", "answers"])
    assert [r["id"] for r in rows] == ["0-0-0", "x"]
    assert rows[0]["answers"] == ["France"] and rows[0]["answer_starts"] == [context.index("France")]
    assert rows[1]["answer_starts"] == [0, -1]  # Rome is not in the context
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "y", "answers": [{"text": "France"}]}]}]}]}))
    with pytest.raises(DataError, match=r"mine.json: article 0 \(t\) is not SQuAD-shaped: no 'question'"):
        read_split(SplitSource(file=str(path)), "", "test", ["context", "question", "answers"])


@pytest.mark.parametrize("fmt", ["csv", "jsonl_string", "jsonl_hub", "csv_json_list"])
def test_answers_in_other_shapes_become_lists(fmt, tmp_path):
    """A csv column holds one answer (or a JSON list); a hub/``to_json`` row holds SQuAD's
    ``{"text": [...], "answer_start": [...]}``: all become a list of answer strings, never its characters
    or the dict's keys."""
    from datamodules.readers import DataError
    from tasks.spec import SplitSource

    context = "The film was great and long."
    if fmt.startswith("csv"):
        answer = '"[""great"", ""long""]"' if fmt == "csv_json_list" else "great"
        path = tmp_path / "qa.csv"
        path.write_text(f"context,question,answers,answer_starts\n{context.replace(',', '')},How was it?,{answer},13\n")
    else:
        answers = "great" if fmt == "jsonl_string" else {"text": ["great"], "answer_start": [13]}
        path = tmp_path / "qa.jsonl"
        path.write_text(json.dumps({"context": context, "question": "How was it?", "answers": answers}) + "\n")
    row = read_split(SplitSource(file=str(path)), "", "train", ["context", "question", "answers"])[0]
    assert row["answers"] == (["great", "long"] if fmt == "csv_json_list" else ["great"])
    if fmt != "jsonl_string":
        assert row["answer_starts"] == [13]
    # an empty cell is no answer (refused when encoded, as unanswerable); "[1]" is an answer, not JSON
    path = tmp_path / "cells.csv"
    path.write_text("context,question,answers\nThe film was long.,Who directed it?,\nIt cost [1] dollar.,Cost?,[1]\n")
    rows = read_split(SplitSource(file=str(path)), "", "train", ["context", "question", "answers"])
    assert [r["answers"] for r in rows] == [[], ["[1]"]]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"context": context, "question": "q", "answers": {"start": 1}}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl .id 'train-0'.: 'answers' is an object without 'text'"):
        read_split(SplitSource(file=str(path)), "", "train", ["context", "question", "answers"])


def test_extractive_span_without_answer_starts(tiny, tmp_path):
    """A user file with answers but no character starts: the span is the answer's first occurrence
    in the context, not "no answer" at position 0."""
    from datamodules import QuestionAnsweringDataModule

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"context": "The film was great and long.", "question": "How was it?",
                                "answers": ["great"]}) + "\n")
    dm = QuestionAnsweringDataModule(task="squad", backbone=tiny("bert"), train_file=str(path), validation_file=str(path),
                                     test_file=str(path), format="jsonl")
    dm.setup("fit")
    item = dm.datasets["train"][0]
    start, end = item["span"]
    assert start > 0
    a, b = item["offsets"][start][0], item["offsets"][end][1]
    assert item["context"][a:b] == "great"


@pytest.mark.parametrize("arch", ["llama", "bert"])  # generated answers, extracted spans
def test_training_context_moves_to_keep_a_cut_answer(arch, tiny, tmp_path):
    """A training row whose answer ``max_length`` would cut off gets a context that starts later, so
    the answer is in the prompt it is trained on; evaluation rows are cut as they are."""
    from datamodules import QuestionAnsweringDataModule

    filler = " ".join(f"word{i}" for i in range(60))
    context = f"{filler} The film was great and long."
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"context": context, "question": "How was it?", "answers": ["great"],
                                "answer_starts": [context.index("great")]}) + "\n")
    dm = QuestionAnsweringDataModule(task="squad", backbone=tiny(arch), train_file=str(path), validation_file=str(path),
                                     test_file=str(path), format="jsonl", max_length=48)
    dm.setup("fit")
    train, val = dm.datasets["train"][0], dm.datasets["validation"][0]
    assert dm.rows_moved == 1
    assert len(train["input_ids"]) <= 48
    if arch == "bert":
        (start, end), (vstart, _) = train["span"], val["span"]
        assert train["context"][train["offsets"][start][0]:train["offsets"][end][1]] == "great"
        assert vstart == 0  # evaluation: cut away, as it is
    else:
        text = lambda item: dm.tokenizer.decode(item["input_ids"])  # noqa: E731
        assert "great" in text(train) and "great" not in text(val)
        assert "word0 " not in text(train) and "word0 " in text(val)


def test_byte_order_mark_is_not_text(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark: not part of the first column's name or value."""
    from tasks.spec import SplitSource

    for name, text, columns in (("h.csv", "sentence,label\nhello,1\n", None), ("n.tsv", "hello\t1\n", ["sentence", "label"]),
                                ("j.jsonl", '{"sentence": "hello", "label": "1"}\n', None)):
        path = tmp_path / name
        path.write_bytes(("\ufeff" + text).encode("utf-8"))
        rows = read_split(SplitSource(file=str(path), columns=columns), "", "train", ["sentence", "label"])
        assert rows[0]["sentence"] == "hello", name


@pytest.mark.parametrize("pred,golds,em,f1", [
    ("the Denver Broncos", ["Denver Broncos"], 1.0, 1.0),          # article and case dropped
    ("Denver Broncos!", ["Denver Broncos", "Broncos"], 1.0, 1.0),  # punctuation dropped
    ("Broncos of Denver", ["Denver Broncos"], 0.0, 0.8),           # P 2/3, R 2/2 -> 0.8
    ("Carolina", ["Denver Broncos", "Carolina Panthers"], 0.0, 2 / 3),  # best gold: P 1, R 1/2
    ("", ["x"], 0.0, 0.0),
])
def test_squad_metric_hand_computed(pred, golds, em, f1):
    out = squad([pred], [golds])
    assert out["em"] == pytest.approx(em) and out["f1"] == pytest.approx(f1)


def test_normalize_answer():
    assert normalize_answer("  The  Quick, brown fox. ") == "quick brown fox"


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("squad") / "tiny-squad.json"
    paragraphs = [{"context": "The film was great and the acting was wonderful.",
                   "qas": [{"id": f"q{i}", "question": "How was the film?", "answers": [{"text": "great", "answer_start": 13}]}
                           for i in range(4)]}]
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    return str(path)


def make_qa(backbone, squad_file):
    from datamodules import QuestionAnsweringDataModule

    dm = QuestionAnsweringDataModule(task="squad", backbone=backbone, train_file=squad_file, validation_file=squad_file,
                                     test_file=squad_file, batch_size=4, eval_batch_size=4, max_length=64)
    dm.setup()
    return dm


def greedy_without_cache(model, batch, steps: int) -> list[list[int]]:
    """Reference decoding: rerun the whole prompt plus the tokens so far at every step."""
    out = []
    for _ in range(steps):
        feed = model.feed(batch)
        if out:
            ids = torch.tensor(out).t()  # (B, t)
            embeds = model.backbone.get_input_embeddings()(ids)
            pos = feed.position_ids[:, -1:] + torch.arange(1, ids.size(1) + 1)
            feed = feed.appended(embeds, torch.ones_like(ids), pos)
        hidden = base_forward(model.backbone, feed).last_hidden_state[:, -1]
        out.append(model.backbone.get_output_embeddings()(hidden).argmax(-1).tolist())
    return [list(col) for col in zip(*out)]


@pytest.mark.parametrize("name", ["hard_prompt", "soft_prompt", "prefix_tuning", "p_tuning"])
def test_generation_with_each_method_matches_uncached(name, tiny, squad_file):
    cls, kwargs = METHODS[name]
    backbone = tiny("llama")
    dm = make_qa(backbone, squad_file)
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, max_new_tokens=4, **kwargs)
    model.eval()
    model.readout.eos_id, model.readout.line_ends = -1, False  # never stop early: all 4 steps compared
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        cached = model.readout.generate(model.backbone, model.feed(batch))
        reference = greedy_without_cache(model, batch, 4)
    assert cached == reference


@pytest.mark.parametrize("name", ["soft_prompt", "p_tuning", "fine_tuning"])
def test_generation_seq2seq(name, tiny, squad_file):
    cls, kwargs = METHODS[name]
    backbone = tiny("t5")
    dm = make_qa(backbone, squad_file)
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, readout="generate", max_new_tokens=3,
                **{k: v for k, v in kwargs.items()})
    batch = next(iter(dm.val_dataloader()))
    loss = model.readout.loss(model.backbone, model.feed(batch), batch["target_ids"], batch["target_mask"])
    assert torch.isfinite(loss) and loss.requires_grad
    model.eval()
    answers = model.readout.generate(model.backbone, model.feed(batch))
    # the answer is trained and decoded as T5 fills a masked span: <extra_id_0> answer <extra_id_1> </s>
    first, second = (dm.tokenizer.convert_tokens_to_ids(t) for t in ("<extra_id_0>", "<extra_id_1>"))
    for ids, n in zip(batch["target_ids"].tolist(), batch["target_mask"].sum(1).tolist()):
        assert ids[0] == first and ids[n - 2:n] == [second, dm.tokenizer.eos_token_id] and n > 3
    # reference: greedy decoding without a cache from <extra_id_0>, three steps, cut at the end token or <extra_id_1>
    with torch.no_grad():
        feed = model.feed(batch)
        enc = base_forward(model.backbone, feed).last_hidden_state
        start = model.backbone.config.decoder_start_token_id
        dec = torch.tensor([[start, first]] * 4)
        for _ in range(3):
            logits = model.backbone(encoder_outputs=(enc,), attention_mask=feed.attention_mask, decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    stops = {model.readout.eos_id, second}
    expected = [row[: next((i for i, t in enumerate(row) if t in stops), len(row))] for row in dec[:, 2:].tolist()]
    assert answers == expected and len(answers) == 4
    # a checkpoint's own generation settings (BART-style beams, a minimum length, n-gram blocking, a forced
    # first token) do not turn the greedy decoding into something else
    own = model.backbone.generation_config
    for key, value in {"num_beams": 3, "min_new_tokens": 3, "no_repeat_ngram_size": 1, "forced_bos_token_id": 7,
                       "repetition_penalty": 5.0}.items():
        setattr(own, key, value)
    assert model.readout.generate(model.backbone, model.feed(batch)) == expected
    assert model.backbone.generation_config is own and own.num_beams == 3
    # a pretrained T5 closes the span with <extra_id_1> and goes on; the answer stops there
    model.backbone.generate = lambda **kw: torch.tensor([[start, first, 11, 12, second, 13, 1]] * 4)
    assert model.readout.generate(model.backbone, model.feed(batch)) == [[11, 12]] * 4


def test_generative_loss_falls(tiny, squad_file):
    torch.manual_seed(0)
    backbone = tiny("llama")
    dm = make_qa(backbone, squad_file)
    cls, kwargs = METHODS["soft_prompt"]
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, **kwargs)
    model.configure_trainable()
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=model.lr)
    losses = []
    for _ in range(30):
        loss = model.readout.loss(model.backbone, model.feed(batch), batch["target_ids"], batch["target_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("arch", ["llama", "bert"])  # generated answers, extracted spans
@pytest.mark.parametrize("max_new_tokens", [None, 2])
def test_answer_length_follows_the_task_unless_set(arch, max_new_tokens, tiny, squad_file, tmp_path):
    """Unset, ``max_new_tokens`` is the task's ``max_answer_tokens`` (which cuts the training targets)
    once the module runs with the data module; set, it wins."""
    import lightning as L

    dm = make_qa(tiny(arch), squad_file)
    dm.spec.max_answer_tokens = 5
    model = SoftPrompt(backbone=tiny(arch), verbalizer=dm.verbalizer, num_virtual_tokens=2, max_new_tokens=max_new_tokens)
    limit = "max_new_tokens" if arch == "llama" else "max_answer_tokens"
    assert getattr(model.readout, limit) == (max_new_tokens or 24)
    model.head_trained = True  # the span head: as if loaded from a fitted run
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_predict_batches=1)
    trainer.predict(model, datamodule=dm)
    assert getattr(model.readout, limit) == (max_new_tokens or 5)
    if arch == "llama":
        batch = next(iter(dm.test_dataloader()))
        with torch.no_grad():
            answers = model.readout.generate(model.backbone, model.feed(batch))
        assert 0 < max(len(a) for a in answers) <= (max_new_tokens or 5)
    # a checkpoint keeps the length: loaded by hand, without a trainer, the module answers as trained
    trainer.save_checkpoint(tmp_path / "qa.ckpt")
    loaded = SoftPrompt.load_from_checkpoint(tmp_path / "qa.ckpt", verbalizer=dm.verbalizer)
    assert getattr(loaded.readout, limit) == (max_new_tokens or 5)


def test_generation_needs_a_decoder(tiny):
    from prompt_methods import SoftPrompt
    from prompt_methods.backbone import BackboneError

    with pytest.raises(BackboneError, match="model.init_args.readout"):
        SoftPrompt(backbone=tiny("bert"), verbalizer=[], readout="generate")


@pytest.mark.parametrize("name,arch", [("soft_prompt", "bert"), ("p_tuning", "bert"), ("prefix_tuning", "bert"),
                                       ("fine_tuning", "bert"), ("soft_prompt", "minilm")])
def test_extractive_spans_stay_aligned(name, arch, tiny, squad_file):
    """Gold spans point at the answer tokens, and with prepended prompt vectors the span head still
    scores the original positions: the predicted text is cut from the context at the right place."""
    backbone = "minilm-l6" if arch == "minilm" else tiny("bert")
    dm = make_qa(backbone, squad_file)
    batch = next(iter(dm.train_dataloader()))
    for i in range(len(batch["ids"])):
        s, e = batch["span_start"][i].item(), batch["span_end"][i].item()
        offsets = batch["offsets"][i]
        assert batch["context"][i][offsets[s][0]:offsets[e][1]] == "great"
    cls, kwargs = METHODS[name]
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, **kwargs)
    model.configure_trainable()
    assert type(model.readout).__name__ == "SpanHead"
    feed = model.feed(batch)
    start, end = model.readout.logits(model.backbone, feed, batch["context_mask"])
    assert start.shape == batch["input_ids"].shape  # prepended positions dropped
    prepended = kwargs.get("num_virtual_tokens", 0) if name in ("soft_prompt", "p_tuning") else 0  # a prefix sits in the cache
    training, context = model.backbone.training, batch["context_mask"]
    model.backbone.eval()  # a tuned backbone's dropout off, for two equal forwards
    with torch.no_grad():
        start = model.readout.logits(model.backbone, model.feed(batch), context)[0]
        hidden = base_forward(model.backbone, model.feed(batch)).last_hidden_state
        assert hidden.size(1) == prepended + batch["input_ids"].size(1)
        expected = model.readout.linear(hidden[:, prepended:]).float()[..., 0]  # the input's own positions
    torch.testing.assert_close(start[context], expected[context])
    model.backbone.train(training)
    # overfit the span: the prediction must become the gold text
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05 if name != "fine_tuning" else 1e-3)
    for _ in range(40):
        loss = model.readout.loss(model.backbone, model.feed(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert model.answer_texts(batch) == ["great"] * len(batch["ids"])


@pytest.mark.parametrize("case", ["soft_prompt", "p_tuning_leading_part"])
def test_generation_and_answer_loss_with_a_shared_prompt_row(case, tiny, squad_file, monkeypatch):
    """A prompt run as a shared row generates the same answers as the uncached reference and as the
    prompt in every row, with the same answer loss and gradients: a soft prompt long enough to take
    the row (40 vectors, batch 4), and P-tuning with slots before the context, whose leading slots
    and the tokens every row starts with move into the row."""
    from datamodules import QuestionAnsweringDataModule
    from prompt_methods import PTuning, prompt_cache

    backbone = tiny("llama")
    if case == "soft_prompt":
        dm, make = make_qa(backbone, squad_file), lambda share: SoftPrompt(
            backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=40, max_new_tokens=4, share_prompt=share)
    else:
        monkeypatch.setattr(prompt_cache, "ROW_SAVING", 0.0)  # take the row for any saving, to compare
        dm = QuestionAnsweringDataModule(task="squad", backbone=backbone, train_file=squad_file, validation_file=squad_file,
                                         test_file=squad_file, batch_size=4, eval_batch_size=4, max_length=64,
                                         template="{soft:3} {context} Question: {question} Answer: {mask}")
        dm.setup()
        make = lambda share: PTuning(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=3,  # noqa: E731
                                     encoder_hidden=16, max_new_tokens=4, share_prompt=share)
    batch = next(iter(dm.train_dataloader()))
    answers, losses, grads = [], [], []
    for share in (True, False):
        torch.manual_seed(0)
        model = make(share)
        model.configure_trainable()
        model.readout.eos_id, model.readout.line_ends = -1, False  # never stop early: all 4 steps compared
        feed = model.feed(batch)
        assert (feed.prompt_row is not None) is share
        if share and case != "soft_prompt":  # the 3 leading slots and more left the rows
            assert feed.inputs_embeds.size(1) < batch["input_ids"].size(1) - 3
        with torch.no_grad():
            answers.append(model.readout.generate(model.backbone, model.feed(batch)))
            assert answers[-1] == greedy_without_cache(model, batch, 4)
        loss = model.loss(batch)[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert answers[0] == answers[1]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)
    assert grads[1] and all(g.abs().max() > 0 for g in grads[1])
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_generation_stops_at_a_line_break_after_text(tiny, squad_file):
    """An answer is the first line of the stripped generated text, so a row stops at a line break
    that follows text: the same answers in fewer decoding steps. A leading line break does not
    stop it. The LM head is scripted to produce known texts."""
    backbone = tiny("llama")
    dm = make_qa(backbone, squad_file)
    model = SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=2, max_new_tokens=16).eval()
    tok = model.tokenizer
    batch = next(iter(dm.val_dataloader()))
    B, vocab = len(batch["ids"]), model.backbone.get_input_embeddings().num_embeddings
    texts = ["great\nthe movie was", "\ngreat movie\nthe end"]
    scripts = [tok.encode(texts[b % 2], add_special_tokens=False) for b in range(B)]
    assert all(tok.decode(s) == texts[b % 2] for b, s in enumerate(scripts))  # the tokenizer has line breaks
    filler = tok.encode(" the", add_special_tokens=False)[0]
    assert model.readout.token_has_text.numel() == max(vocab, len(tok))  # any id the head can pick

    class ScriptedHead:
        calls = 0

        def __call__(self, hidden):
            step, logits = self.calls, torch.zeros(hidden.size(0), vocab)
            for b in range(hidden.size(0)):
                logits[b, scripts[b][step] if step < len(scripts[b]) else filler] = 1.0
            self.calls += 1
            return logits

    runs = {}
    for line_ends in (True, False):
        head = ScriptedHead()
        model.readout.line_ends = line_ends
        model.backbone.get_output_embeddings = lambda: head  # noqa: B023
        runs[line_ends] = (model.answer_texts(batch), head.calls)
    assert runs[True][0] == runs[False][0] == ["great", "great movie"] * (B // 2) + ["great"] * (B % 2)
    # a row's last step is the first whose text so far, stripped on the left, holds a line break
    ends = [next(k for k in range(1, len(s) + 1) if "\n" in tok.decode(s[:k]).lstrip()) for s in scripts]
    assert runs[False][1] == 16 and runs[True][1] == max(ends) < 16


def test_span_prediction_starts_and_ends_on_context_tokens():
    """Training aims at position 0 when truncation cut the answer off, so position 0 may score high; a
    predicted span still has to start and end on context tokens (a span from position 0 into the
    context would be cut as empty text)."""
    from prompt_methods.span import SpanHead

    head = SpanHead(hidden_size=4, max_answer_tokens=3)
    start = torch.tensor([[9.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])  # (B, T); row 1 has no context token
    end = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    head.logits = lambda backbone, feed, mask: (start, end)
    batch = {"context_mask": None, "context": ["hello big world", "x"],
             "offsets": [{2: (0, 5), 3: (6, 9), 4: (10, 15)}, {}]}
    assert head.predict(None, None, batch) == ["hello big", ""]


@pytest.mark.parametrize("share", [True, False])
def test_answer_loss_and_generation_run_the_last_layer_only_where_read(share, tiny, squad_file, monkeypatch):
    """The answer loss runs the last layer's MLP only on the positions that predict the answer's tokens,
    and generation's first pass only on the last one: the same loss, gradients and answers as the whole layer."""
    from prompt_methods import runtime

    backbone = tiny("llama")
    dm = make_qa(backbone, squad_file)
    batch = next(iter(dm.train_dataloader()))
    losses, grads, answers, widths = [], [], [], []
    for trim in (True, False):
        monkeypatch.setattr(runtime, "TRIM_TAIL", trim)
        torch.manual_seed(0)
        model = SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=40 if share else 4,
                           max_new_tokens=4, share_prompt=share)
        model.configure_trainable()
        model.readout.eos_id, model.readout.line_ends = -1, False  # never stop early: all 4 steps compared
        assert (model.feed(batch).prompt_row is not None) is share
        seen = []
        first = runtime.repeated_blocks(model.backbone)[-1].mlp.gate_proj
        handle = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].size(1)))
        loss = model.loss(batch)[0]
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        with torch.no_grad():
            answers.append(model.readout.generate(model.backbone, model.feed(batch)))
        handle.remove()
        widths.append(seen[:2])  # the loss pass, then generation's first pass
    assert widths[0] == [batch["target_ids"].size(1) + 1, 1]
    assert widths[1][0] > widths[0][0] and widths[1][1] > 1
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)
    assert grads[1] and all(g.abs().max() > 0 for g in grads[1])
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert answers[0] == answers[1]
    assert answers[0] == greedy_without_cache(model, batch, 4)
