"""Every method on every tiny architecture: trainable parameters, shapes, ids/embeds equivalence, overfitting."""

from __future__ import annotations

import warnings

import pytest
import torch

from prompt_methods import FineTuning, HardPrompt, PrefixTuning, PTuning, SoftPrompt
from prompt_methods.backbone import BackboneError

ARCHS = ["llama", "gpt2", "bert", "t5"]
METHODS = {
    "hard_prompt": (HardPrompt, {}),
    "hard_prompt_tuned": (HardPrompt, {"tune_backbone": True, "lr": 1e-3}),
    "soft_prompt": (SoftPrompt, {"num_virtual_tokens": 5, "lr": 0.5}),
    "prefix_tuning": (PrefixTuning, {"num_virtual_tokens": 4, "lr": 0.3}),
    "prefix_tuning_mlp": (PrefixTuning, {"num_virtual_tokens": 4, "reparameterize": True, "mlp_hidden": 16, "init": "random", "lr": 0.01}),
    "p_tuning": (PTuning, {"num_virtual_tokens": 3, "encoder_hidden": 16, "lr": 0.01}),
    "p_tuning_mlp": (PTuning, {"num_virtual_tokens": 3, "encoder": "mlp", "encoder_hidden": 16, "lr": 0.01}),
    "fine_tuning": (FineTuning, {"lr": 1e-3}),
}


def expected_trainable(name: str, model) -> int:
    """Parameter counts from each method's formula, computed from the backbone config."""
    cfg = model.backbone.config.get_text_config()
    H, C = cfg.hidden_size, model.num_labels
    backbone_total = sum(p.numel() for p in model.backbone.parameters())
    kw = METHODS[name][1]
    if name == "hard_prompt":
        return 0
    if name == "hard_prompt_tuned":
        return backbone_total
    if name == "fine_tuning":
        unused = sum(p.numel() for p in model.unused_lm_head_params())
        return backbone_total - unused + H * C + C
    if name == "soft_prompt":
        return kw["num_virtual_tokens"] * H
    if name.startswith("prefix_tuning"):
        P, L = kw["num_virtual_tokens"], cfg.num_hidden_layers
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        D = 2 * L * kv * (getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads)
        if kw.get("reparameterize"):
            M = kw["mlp_hidden"]
            return P * H + H * M + M + M * D + D
        return P * D
    N, E = kw["num_virtual_tokens"], kw["encoder_hidden"]
    mlp = E * E + E + E * H + H
    if kw.get("encoder") == "mlp":
        return N * H + H * E + E + E * H + H
    h = E // 2  # per direction
    lstm = 2 * (4 * h * (H + h) + 8 * h) + 2 * (4 * h * (E + h) + 8 * h)
    return N * H + lstm + mlp


def build(name, arch, tiny, make_data, **extra):
    cls, kwargs = METHODS[name]
    backbone = tiny(arch)
    dm = make_data(backbone)
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, **{**kwargs, **extra})
    model.configure_trainable()
    return model, dm


def supported(name, arch) -> bool:
    return not (name.startswith("prefix_tuning") and arch == "t5")


CASES = [(n, a) for n in METHODS for a in ARCHS]


@pytest.mark.parametrize("name,arch", CASES)
def test_trainable_params_and_shapes(name, arch, tiny, make_data):
    if not supported(name, arch):
        with pytest.raises(BackboneError, match="model.class_path: PrefixTuning"):
            build(name, arch, tiny, make_data)
        return
    model, dm = build(name, arch, tiny, make_data)
    batch = next(iter(dm.train_dataloader()))
    scores = model(batch)
    assert scores.shape == (len(batch["labels"]), 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == expected_trainable(name, model)
    if name == "fine_tuning":  # the head reads the last hidden states: only what never feeds them is frozen
        frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
        unused = {"llama": (), "gpt2": (), "bert": ("cls.",), "t5": ("decoder.", "lm_head.")}[arch]
        assert frozen == {n for n, _ in model.backbone.named_parameters() if n.startswith(unused)}, frozen
        assert frozen or arch in ("llama", "gpt2")
    if not trainable:
        assert not scores.requires_grad
        return
    torch.nn.functional.cross_entropy(scores, batch["labels"]).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None, f"{n} got no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


@pytest.mark.parametrize("name,arch", [c for c in CASES if supported(*c)])
def test_input_ids_equal_inputs_embeds(name, arch, tiny, make_data):
    model, dm = build(name, arch, tiny, make_data)
    model.eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        from_ids = model(batch)
        embeds = model.backbone.get_input_embeddings()(batch["input_ids"])
        from_embeds = model({**batch, "inputs_embeds": embeds})
        moved = model({**batch, "inputs_embeds": embeds + 0.5 * torch.randn_like(embeds)})
    torch.testing.assert_close(from_ids, from_embeds)
    assert not torch.allclose(moved, from_ids, atol=1e-4)  # the given embeddings are the ones used


@pytest.mark.parametrize("name,arch", [c for c in CASES if supported(*c) and c[0] != "hard_prompt"])
def test_overfit_one_batch(name, arch, tiny, make_data):
    torch.manual_seed(0)
    model, dm = build(name, arch, tiny, make_data)
    model.eval()  # no dropout: the loss must fall deterministically
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=model.lr)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_soft_prompt_fills_template_slots(tiny, make_data):
    backbone = tiny("llama")
    dm = make_data(backbone, template="{soft:2} Review: {sentence} {soft:1} Sentiment: {mask}")
    batch = next(iter(dm.val_dataloader()))
    assert (batch["soft_index"] >= 0).sum(1).tolist() == [3] * len(batch["labels"])
    model = SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=3, share_prompt=False)
    feed = model.feed(batch)  # in the rows (the shared row would take the leading part: compared elsewhere)
    slots = batch["soft_index"] >= 0
    expected = model.prompt[batch["soft_index"][slots]]
    torch.testing.assert_close(feed.inputs_embeds[slots], expected)
    assert feed.inputs_embeds.shape[1] == batch["input_ids"].shape[1]  # nothing prepended
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=5).feed(batch)


def test_hard_prompt_rejects_soft_slots(tiny, make_data):
    backbone = tiny("llama")
    dm = make_data(backbone, template="{soft:2} {sentence} It was {mask}")
    model = HardPrompt(backbone=backbone, verbalizer=dm.verbalizer)
    with pytest.raises(ValueError, match="data.init_args.template"):
        model(next(iter(dm.val_dataloader())))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_matches_cache_continuation(arch, tiny, make_data):
    """A prefix built from text keys/values gives the same scores as running that text first:
    the attention mask and the position ids after the prefix are right. The cache goes in under the
    name the installed transformers takes (5.24 deprecated ``past_key_values``: that warning fails it)."""
    warnings.filterwarnings("error", message=".*past_key_values.* is deprecated")  # pytest restores the filters
    backbone = tiny(arch)
    dm = make_data(backbone)
    model = PrefixTuning(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=3, init="text",
                         init_text="review sentiment text")
    model.eval()
    batch = next(iter(dm.val_dataloader()))
    ids = model.tokenizer("review sentiment text", add_special_tokens=False)["input_ids"][:3]
    # the same prompt, with the text spelled out as real tokens after the left padding
    B, T = batch["input_ids"].shape
    n_pad = (batch["attention_mask"] == 0).sum(1)
    rows, masks = [], []
    for i in range(B):
        real = batch["input_ids"][i, n_pad[i]:]
        rows.append(torch.cat([batch["input_ids"][i, : n_pad[i]], torch.tensor(ids), real]))
    spelled = {**batch, "input_ids": torch.stack(rows), "attention_mask": torch.stack(
        [torch.cat([torch.zeros(int(n)), torch.ones(T - int(n) + 3)]).long() for n in n_pad]),
        "soft_index": torch.full((B, T + 3), -1)}
    hard = HardPrompt(backbone=backbone, verbalizer=dm.verbalizer)
    hard.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch), hard(spelled), atol=1e-4, rtol=1e-4)


def test_soft_prompt_init_from_text(tiny, make_data):
    backbone = tiny("llama")
    dm = make_data(backbone)
    model = SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=7, init="text",
                       init_text="great movie")
    ids = model.tokenizer("great movie", add_special_tokens=False)["input_ids"]
    table = model.backbone.get_input_embeddings().weight
    expected = table[torch.tensor((ids * 7)[:7])]
    torch.testing.assert_close(model.prompt.data, expected.detach())
    with pytest.raises(ValueError, match="model.init_args.init_text is required"):
        SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, init="text")


def test_soft_prompt_vocab_init_follows_the_run_seed(tiny, make_data):
    """``init: vocab`` rows are token embeddings drawn with the run's seed unless ``init_seed`` is set."""
    import lightning as L

    backbone = tiny("llama")
    dm = make_data(backbone)

    def prompt(seed, **kwargs):
        L.seed_everything(seed)
        return SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=6, **kwargs).prompt.data

    table = SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer).backbone.get_input_embeddings().weight.detach()
    a, b = prompt(13), prompt(87)
    assert all(any(torch.equal(row, t) for t in table) for row in a)  # every row is a token embedding
    torch.testing.assert_close(prompt(13), a)
    assert not torch.equal(a, b)
    torch.testing.assert_close(prompt(13, init_seed=5), prompt(87, init_seed=5))
    low = prompt(13, init_vocab_ids=10)  # only the 10 lowest ids
    assert all(any(torch.equal(row, t) for t in table[:10]) for row in low)
    torch.testing.assert_close(prompt(13, init_vocab_ids=len(table)), a)  # the whole vocabulary is the default
    import inspect

    from prompt_methods.soft_prompt import vocab_rows

    assert inspect.signature(SoftPrompt.__init__).parameters["init_vocab_ids"].default is None
    assert vocab_rows(torch.arange(10000.0).unsqueeze(1), 200, 0, None).max() >= 5000  # drawn from all of a large table
    with pytest.raises(ValueError, match="model.init_args.init_vocab_ids"):
        prompt(13, init_vocab_ids=0)


@pytest.mark.parametrize("name", ["hard_prompt", "soft_prompt", "prefix_tuning", "p_tuning"])
def test_shared_prompt_scoring_equals_naive(name, tiny, make_data):
    """Multi-token label words scored against one shared prompt cache equal running the whole prompt
    once per word (with several words per label)."""
    cls, kwargs = METHODS[name]
    backbone = tiny("llama")
    dm = make_data(backbone, label_words={"0": ["terrible", "bad movie"], "1": ["wonderful", "great"]})
    assert max(len(w) for words in dm.verbalizer for w in words) > 1
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, **kwargs)
    model.eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        shared = model(batch)
        naive = model.readout.naive(model.backbone, lambda: model.feed(batch))
    torch.testing.assert_close(shared, naive, atol=1e-4, rtol=1e-4)


def loss_scores_grads(model, batch) -> tuple:
    """One training step's loss, scores and the gradients of the trained parameters (no update)."""
    loss, scores = model.loss(batch)
    loss.backward()
    return loss.detach(), scores.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same_training(a: tuple, b: tuple) -> None:
    """Two ``loss_scores_grads`` results agree, and the gradients are not all zero."""
    (loss_a, scores_a, grads_a), (loss_b, scores_b, grads_b) = a, b
    torch.testing.assert_close(scores_a, scores_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-4)
    assert len(grads_a) == len(grads_b) > 0
    for x, y in zip(grads_a, grads_b):
        assert y.abs().max() > 0
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name,extra", [("soft_prompt", {"num_virtual_tokens": 16}), ("soft_prompt", {"num_virtual_tokens": 24}),
                                        ("p_tuning", {"num_virtual_tokens": 16})])
def test_prompt_run_once_per_batch_equals_per_row(name, extra, arch, tiny, make_data):
    """Prompt vectors before the input, run once per batch in a shared row (``share_prompt``),
    give the scores, loss and prompt gradient of running them in every row: with several label
    words of several tokens (the continuation pass reuses the cache) and with a prompt longer than
    the batch's rows (24 vectors: the rows are padded to the prompt row's width)."""
    cls, kwargs = METHODS[name]
    backbone = tiny(arch)
    dm = make_data(backbone, label_words={"0": ["terrible", "bad movie"], "1": ["wonderful", "great"]})
    batch = next(iter(dm.train_dataloader()))
    assert (batch["attention_mask"] == 0).any()  # left padding between the prompt and some rows' tokens
    results = []
    for share in (True, False):
        torch.manual_seed(0)
        model = cls(backbone=backbone, verbalizer=dm.verbalizer, share_prompt=share, **{**kwargs, **extra})
        model.configure_trainable()
        assert model.shares_prompt() is share
        feed = model.feed(batch)
        assert (feed.prompt_row is not None) is share
        if share:  # rows as wide as the longer of the batch and the prompt
            n = feed.attention_mask.size(1) - feed.inputs_embeds.size(1)
            assert feed.inputs_embeds.size(1) == max(batch["input_ids"].size(1), n)
        results.append(loss_scores_grads(model, batch))
    assert_same_training(*results)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name,template,n", [("p_tuning", "{soft:3} Review: {sentence} {soft:3} Sentiment: {mask}", 6),
                                             ("soft_prompt", "Review: {sentence} Sentiment: {mask}", 2)])
def test_leading_template_part_shared_once_per_batch(name, template, n, arch, tiny, make_data, monkeypatch):
    """The template's leading part that every row starts with (P-tuning's leading slots and text;
    a short soft prompt's following text) moves into the shared row: the rows get shorter and the
    scores, loss and gradients equal those of the per-row prompt."""
    from prompt_methods import prompt_cache

    monkeypatch.setattr(prompt_cache, "ROW_SAVING", 0.0)  # take the row for any saving, to compare
    cls, kwargs = METHODS[name]
    backbone = tiny(arch)
    dm = make_data(backbone, template=template, label_words={"0": ["terrible", "bad movie"], "1": ["wonderful", "great"]})
    batch = next(iter(dm.train_dataloader()))
    assert (batch["attention_mask"] == 0).any()
    results = []
    for share in (True, False):
        torch.manual_seed(0)
        model = cls(backbone=backbone, verbalizer=dm.verbalizer, share_prompt=share, **{**kwargs, "num_virtual_tokens": n})
        model.configure_trainable()
        feed = model.feed(batch)
        assert (feed.prompt_row is not None) is share
        if share:  # "Review:" (and P-tuning's 3 leading slots) left the rows
            assert feed.inputs_embeds.size(1) <= batch["input_ids"].size(1) - (5 if name == "p_tuning" else 2)
        results.append(loss_scores_grads(model, batch))
    assert_same_training(*results)


def test_shared_lead_counts_what_every_row_starts_with():
    """Leading tokens and slots common to all rows after their left padding, before the earliest answer."""
    from prompt_methods.feeding import shared_lead

    ids = torch.tensor([[0, 0, 7, 8, 9, 4, 5], [7, 8, 9, 3, 3, 4, 5], [0, 7, 8, 2, 3, 4, 5]])
    mask = (ids > 0).long()
    slots = torch.full_like(ids, -1)
    batch = {"input_ids": ids, "attention_mask": mask, "soft_index": slots, "answer_pos": torch.tensor([6, 6, 6])}
    assert shared_lead(batch) == 2  # 7 8 in every row; the third row has 2, not 9, next
    assert shared_lead({**batch, "answer_pos": torch.tensor([6, 6, 2])}) == 1  # row 3's answer is its 2nd token
    slots[1, 1] = 0  # row 2's second place is a slot, the others' is a token
    assert shared_lead(batch) == 1
    assert shared_lead({k: v[:1] for k, v in batch.items()}) == 0  # one row: nothing to share


def test_slot_gradients_sum_in_the_same_order_every_time(two_threads):
    """A seeded run must repeat itself: the prompt's gradient from the template's slots (each slot in
    every row, plus the zeros of non-slot places) is bitwise the same on every call with two threads.
    Indexing (``prompt[slots]``) summed them with atomic adds, in a different order from call to call."""
    from prompt_methods.feeding import fill_slots

    gen = torch.Generator().manual_seed(0)
    B, T, N, H = 16, 64, 6, 256
    slots = torch.full((B, T), -1)
    slots[:, 3:6] = torch.arange(3)
    slots[:, 40:43] = torch.arange(3, 6)
    embeds, prompt = torch.randn(B, T, H, generator=gen), torch.randn(N, H, generator=gen)
    upstream = torch.randn(B, T, H, generator=gen)
    grads = set()
    for _ in range(40):
        p = prompt.clone().requires_grad_(True)
        out = fill_slots(embeds, slots, p)
        out.backward(upstream)
        grads.add(p.grad.numpy().tobytes())
    assert len(grads) == 1
    torch.testing.assert_close(p.grad, torch.stack([upstream[slots == j].sum(0) for j in range(N)]))
    torch.testing.assert_close(out[slots < 0], embeds[slots < 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 40], prompt[3].expand(B, H), rtol=0, atol=0)


def test_shared_prompt_row_only_where_it_saves_positions(tiny, make_data):
    """One shared row costs (B + 1) * max(T, N) positions against B * (N + T); it is used where it
    saves ``ROW_SAVING`` of them: not for long inputs, nor for a batch of one."""
    from prompt_methods.prompt_cache import prompt_row_pays

    assert prompt_row_pays(8, 17, 20) and prompt_row_pays(32, 20, 20)
    assert not prompt_row_pays(8, 248, 20) and not prompt_row_pays(32, 197, 20) and not prompt_row_pays(1, 10, 20)
    cls, kwargs = METHODS["soft_prompt"]
    dm = make_data(tiny("llama"))
    model = cls(backbone=tiny("llama"), verbalizer=dm.verbalizer, **{**kwargs, "num_virtual_tokens": 16})
    model.eval()
    batch = next(iter(dm.val_dataloader()))
    one = {k: v[:1] for k, v in batch.items()}
    assert model.feed(batch).prompt_row is not None and model.feed(one).prompt_row is None
    torch.testing.assert_close(model(one), model(batch)[:1], atol=1e-5, rtol=1e-4)


def test_prompt_is_run_in_every_row_where_it_cannot_be_shared(tiny, make_data):
    """Slots after the input, a bidirectional encoder or a tuned backbone keep the prompt in the rows."""
    cls, kwargs = METHODS["soft_prompt"]
    dm = make_data(tiny("llama"), template="{sentence} {soft:5} It was {mask}")
    model = cls(backbone=tiny("llama"), verbalizer=dm.verbalizer, **kwargs)
    assert model.feed(next(iter(dm.val_dataloader()))).prompt_row is None  # slots after the input: in place
    for arch, extra in (("bert", {}), ("llama", {"tune_backbone": True})):
        dm = make_data(tiny(arch))
        model = cls(backbone=tiny(arch), verbalizer=dm.verbalizer, **{**kwargs, **extra})
        assert not model.shares_prompt()
        assert model.feed(next(iter(dm.val_dataloader()))).prompt_row is None


def test_evaluation_loss_is_weighted_and_keeps_a_nan(tiny):
    """The logged evaluation loss weighs each batch by its size, and a diverged batch makes it NaN, not a finite mean of the other batches
    (torchmetrics' default would drop the NaN with a warning)."""
    from prompt_methods import SoftPrompt

    model = SoftPrompt(backbone=tiny("llama"), verbalizer=[[[5]], [[6]]], num_virtual_tokens=2)
    losses = model.eval_losses["val"]
    losses.update(torch.tensor(1.0), weight=1)
    losses.update(torch.tensor(3.0), weight=3)
    assert losses.compute().item() == 2.5  # weighted by batch size
    losses.reset()
    losses.update(torch.tensor(1.0), weight=4)
    losses.update(torch.tensor(float("nan")), weight=4)
    assert torch.isnan(losses.compute())


@pytest.mark.parametrize("first", ["validate", "test", "predict"])
def test_fit_after_an_evaluation_run(first, tiny, make_data):
    """A module evaluated first (Lightning runs validate, test and predict in inference mode, so the
    metric states they leave are inference tensors) then trained by another trainer: fitting, with
    its validation, runs, and the metrics keep what they held."""
    import lightning as L
    from torchmetrics import Metric

    backbone = tiny("llama")
    dm = make_data(backbone)
    model = SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=4)

    def trainer():
        return L.Trainer(accelerator="cpu", max_steps=2, val_check_interval=1, limit_val_batches=1, limit_test_batches=1,
                         limit_predict_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)

    getattr(trainer(), first)(model, datamodule=dm)
    best = model.val_acc_best.compute().item() if first == "validate" else None
    fit = trainer()
    fit.fit(model, datamodule=dm)
    assert fit.global_step == 2 and "val/loss" in fit.callback_metrics
    states = [v for m in model.modules() if isinstance(m, Metric) for v in m.metric_state.values()]
    assert states and not any(isinstance(v, torch.Tensor) and v.is_inference() for v in states)
    if best is not None:
        assert model.val_acc_best.compute().item() >= best


@pytest.mark.parametrize("stray", [False, True])
def test_eval_mode_warning_only_for_modules_other_than_the_frozen_backbone(stray, tiny, make_data):
    """A frozen backbone runs in eval mode on purpose, so Lightning's "modules in eval mode" warning
    stays quiet for it; a module of the method's own left in eval mode still gets the warning."""
    import warnings

    import lightning as L

    backbone = tiny("llama")
    dm = make_data(backbone)
    model = SoftPrompt(backbone=backbone, verbalizer=dm.verbalizer, num_virtual_tokens=4)
    if stray:
        model.stray = torch.nn.Dropout(0.1).eval()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 1 and not model.backbone.training
    flagged = [str(w.message) for w in caught if "in eval mode at the start of training" in str(w.message)]
    in_eval = sum(not m.training for m in model.modules())
    assert [m.split(" in eval mode")[0] for m in flagged] == ([f"Found {in_eval} module(s)"] if stray else [])


def switched(flag: str, name: str, backbone: str, dm, monkeypatch):
    """The method's module for ``dm``, built from seed 0 with the ``runtime`` switch ``flag`` on, then
    again with it off: yields ``(on, module)``."""
    from prompt_methods import runtime

    cls, kwargs = METHODS[name]
    for on in (True, False):
        monkeypatch.setattr(runtime, flag, on)
        torch.manual_seed(0)
        yield on, cls(backbone=backbone, verbalizer=dm.verbalizer, **kwargs)


def multi_token_batch(backbone: str, make_data) -> tuple:
    """The backbone, a data module whose label words include a two-token one, and its first training batch."""
    dm = make_data(backbone, label_words={"0": ["terrible", "bad movie"], "1": ["wonderful", "great"]})
    return backbone, dm, next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["hard_prompt_tuned", "soft_prompt", "prefix_tuning", "p_tuning", "fine_tuning"])
def test_last_layer_runs_only_where_the_answer_is_read(name, arch, tiny, make_data, monkeypatch):
    """The last layer's MLP runs only at each row's answer position (its attention still reads every
    position), with the scores, loss and gradients of the whole layer, a tuned backbone's last-layer
    weights included; with multi-token label words, whose continuation pass reuses the cache."""
    from prompt_methods import runtime

    cls, kwargs = METHODS[name]
    backbone, dm, batch = multi_token_batch(tiny(arch), make_data)
    results, widths = [], []
    for trim in (True, False):
        monkeypatch.setattr(runtime, "TRIM_TAIL", trim)
        torch.manual_seed(0)
        model = cls(backbone=backbone, verbalizer=dm.verbalizer, **kwargs)
        model.configure_trainable()
        model.eval()  # no dropout: its masks would differ with the layer's shape
        first = next(runtime.repeated_blocks(model.backbone)[-1].mlp.children())  # gate_proj, c_fc
        seen = []
        handle = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].size(1)))
        results.append(loss_scores_grads(model, batch))
        handle.remove()
        widths.append(seen[0])  # the first pass; the continuation pass follows
        assert "forward" not in runtime.repeated_blocks(model.backbone)[-1].mlp.__dict__  # put back
    assert widths[0] == 1 < widths[1]
    assert_same_training(*results)


def checkpointed(model) -> None:
    """Turn on transformers' gradient checkpointing in the model's backbone, as a user would."""
    enable = getattr(model.backbone, "activation_checkpointing_enable", None)  # the older name warns in 5.x
    if enable is None:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.backbone.train()  # transformers checkpoints only in training mode
    model.backbone.config.attention_dropout = 0.0


@pytest.mark.parametrize("name,share", [("soft_prompt", False), ("soft_prompt", True), ("p_tuning", True)])
def test_training_under_gradient_checkpointing(name, share, tiny, make_data):
    """Gradient checkpointing runs each layer again in the backward, outside the forward's trimming:
    the last layer then runs whole. And transformers drops the cache a checkpointed layer is handed
    while training, which is how the shared prompt row reaches the other rows: the prompt then runs in
    every row. Either way, the loss, scores and gradients of a run without checkpointing."""
    from prompt_methods import runtime

    cls, kwargs = METHODS[name]
    backbone = tiny("llama")
    dm = make_data(backbone, label_words={"0": ["the"], "1": ["great"]})  # one token each: no cache in the pass
    batch = next(iter(dm.train_dataloader()))
    results = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        model = cls(backbone=backbone, verbalizer=dm.verbalizer, share_prompt=share, **kwargs)
        model.configure_trainable()
        model.eval()
        if checkpointing:
            checkpointed(model)
            assert runtime.checkpointed_pass(model.backbone) and not model.shares_prompt()
            with torch.no_grad():  # no backward to replay the layers: the row may be used
                assert not runtime.checkpointed_pass(model.backbone) and model.shares_prompt() == share
        elif share:
            assert model.shares_prompt() and model.feed(batch).prompt_row is not None  # the row is taken here
        results.append(loss_scores_grads(model, batch))
    assert_same_training(*results)


@pytest.mark.parametrize("case", ["prefix", "multi_token_words"])
def test_cache_paths_refused_clearly_under_gradient_checkpointing(case, tiny, make_data):
    """Prefix tuning's keys/values and multi-token label words' continuations need the cache that
    transformers drops under gradient checkpointing: a clear error saying so, not a shape mismatch
    deep inside attention. Evaluation (no gradients) still runs."""
    backbone = tiny("llama")
    if case == "prefix":
        cls, kwargs = METHODS["prefix_tuning"]
        dm = make_data(backbone, label_words={"0": ["the"], "1": ["great"]})
        batch = next(iter(dm.train_dataloader()))
    else:
        cls, kwargs = METHODS["soft_prompt"]
        _, dm, batch = multi_token_batch(backbone, make_data)
    model = cls(backbone=backbone, verbalizer=dm.verbalizer, **kwargs)
    model.configure_trainable()
    checkpointed(model)
    with pytest.raises(ValueError, match="gradient checkpointing is on in the backbone.*gradient_checkpointing_disable") as err:
        model.loss(batch)
    assert ("prefix tuning" in str(err.value)) == (case == "prefix")
    assert ("data.init_args.label_words" in str(err.value)) == (case != "prefix")
    with torch.no_grad():
        assert torch.isfinite(model.loss(batch)[0])


@pytest.mark.parametrize("name", ["hard_prompt_tuned", "soft_prompt", "prefix_tuning", "p_tuning", "fine_tuning"])
def test_fused_norms_train_as_the_models_own(name, tiny, make_data, monkeypatch):
    """``setup`` runs the Llama RMSNorms through promptlit's fused norm: the same scores, loss and
    gradients as the model's own norms (a tuned backbone's norm weights included), on norm weights
    that are not all ones."""
    backbone, dm, batch = multi_token_batch(tiny("llama"), make_data)
    results, kinds = [], []
    for _, model in switched("FUSE_NORMS", name, backbone, dm, monkeypatch):
        norms = [m for m in model.backbone.modules() if type(m).__name__ == "LlamaRMSNorm"]
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for norm in norms:
                norm.weight.uniform_(0.5, 1.5, generator=gen)
        model.setup("fit")
        model.train()
        model.eval()  # transformers puts a hub-kernel layer's own forward back when the mode changes
        assert sum("forward" in n.__dict__ for n in norms) == len(norms) == 5  # two per layer and the final one
        seen = []
        hook = norms[-1].register_forward_hook(lambda m, args, out: seen.append(type(out.grad_fn).__name__))
        results.append(loss_scores_grads(model, batch))
        hook.remove()
        kinds.append(seen[0])
    assert kinds[0] != kinds[1] and "RMSNorm" in kinds[0]  # the fused path ran, then the model's own
    assert_same_training(*results)



@pytest.mark.parametrize("name", ["hard_prompt_tuned", "soft_prompt", "prefix_tuning", "p_tuning", "fine_tuning"])
def test_packed_linears_train_as_plain_matmuls(name, tiny, make_data, monkeypatch):
    """``setup`` runs a frozen backbone's linear layers on oneDNN's packed weights, queries, keys and
    values (and the MLP's gate and up projections) as one matmul each: the same scores, loss and
    gradients as plain matmuls. A tuned backbone's layers keep the plain matmuls (their weights move)."""
    from prompt_methods import runtime

    if not runtime._pack_ops_available():
        pytest.skip("this torch has no oneDNN")
    calls = []
    packed = runtime._PackedLinear.forward

    def counted(ctx, x, group, mods):
        calls.append(len(mods))
        return packed(ctx, x, group, mods)

    monkeypatch.setattr(runtime._PackedLinear, "forward", staticmethod(counted))
    backbone, dm, batch = multi_token_batch(tiny("llama"), make_data)
    results, runs = [], []
    for _, model in switched("PACK_LINEARS", name, backbone, dm, monkeypatch):
        model.setup("fit")
        model.train()
        model.eval()
        calls.clear()
        results.append(loss_scores_grads(model, batch))
        runs.append(sorted(set(calls)))
    assert runs[1] == []  # switched off: no packed matmul
    if model.tune_backbone:
        assert runs[0] == []
    else:
        assert runs[0] == [1, 2, 3]  # lone layers, gate with up, queries with keys and values
    assert_same_training(*results)


def test_packed_linear_repacks_a_new_storage_at_the_old_address():
    """A weight replaced by a new storage that sits where the old one was (the allocator reuses freed
    memory, e.g. after ``.bfloat16().float()``), with the same pointer, version and dtype: the layer
    repacks instead of multiplying by the old weight's packed copy."""
    from torch import nn

    from prompt_methods import runtime

    if not runtime._pack_ops_available():
        pytest.skip("this torch has no oneDNN")
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False).requires_grad_(False)
    assert runtime.pack_linears(lin) == 1
    memory = bytearray(lin.weight.numel() * 4)
    first = torch.frombuffer(memory, dtype=torch.float32).view(8, 16)
    first.copy_(lin.weight)
    lin.weight.data = first
    x = torch.randn(3, 16)
    torch.testing.assert_close(lin(x), x @ first.T)  # packed now
    packed_for = (lin.weight.data_ptr(), lin.weight._version, lin.weight.dtype)
    memory[:] = torch.randn(8, 16).numpy().tobytes()  # new values, written past torch's version counter
    lin.weight.data = torch.frombuffer(memory, dtype=torch.float32).view(8, 16)  # a new storage, same address
    assert (lin.weight.data_ptr(), lin.weight._version, lin.weight.dtype) == packed_for
    torch.testing.assert_close(lin(x), x @ lin.weight.T)


def test_packed_linears_follow_their_weights():
    """A packed layer matches ``F.linear`` (bitwise under bf16 autocast), repacks when its weight
    changes in place, leaves a trained weight, a float16 input and a deep copy's weights to the
    right matmul, and siblings called on different inputs go on alone with the right products."""
    import copy

    from torch import nn

    from prompt_methods import runtime

    if not runtime._pack_ops_available():
        pytest.skip("this torch has no oneDNN")
    torch.manual_seed(0)
    block = nn.Module()
    block.q_proj, block.k_proj, block.v_proj = nn.Linear(16, 16, bias=False), nn.Linear(16, 8, bias=False), nn.Linear(16, 8, bias=False)
    block.gate_proj, block.up_proj, block.lone = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(16, 4)
    block.requires_grad_(False)
    assert runtime.pack_linears(block) == 6
    assert runtime.pack_linears(block) == 6  # counted, not wrapped again
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lone")
    x = torch.randn(3, 5, 16, requires_grad=True)

    def both(module, inp):
        return module(inp), torch.nn.functional.linear(inp, module.weight, module.bias)

    for name in names:  # siblings in call order, each on the same input
        out, ref = both(getattr(block, name), x)
        torch.testing.assert_close(out, ref)
    grads = []
    for packed in (True, False):
        runtime.PACK_LINEARS = packed
        try:
            x.grad = None
            q, k, v = block.q_proj(x), block.k_proj(x), block.v_proj(x)
            (q.sin().sum() + k.sum() * 2 + v.cos().sum()).backward()
            grads.append(x.grad.clone())
        finally:
            runtime.PACK_LINEARS = True
        if packed:  # one product: keys and values are the queries' siblings in its storage
            assert k.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    assert grads[0].abs().max() > 0
    assert runtime._GROUPS[block.k_proj] is runtime._GROUPS[block.q_proj]
    with torch.inference_mode():  # Lightning's test and predict: inference tensors have no version counter
        z = torch.randn(2, 16)
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(*both(getattr(block, name), z))
    assert runtime._GROUPS[block.k_proj] is runtime._GROUPS[block.q_proj]  # still siblings
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block.bfloat16()
        out = block.lone(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, torch.nn.functional.linear(x.bfloat16(), block.lone.weight, block.lone.bias), atol=0, rtol=0)
    block.float()
    block.lone(x)
    with torch.no_grad():
        block.lone.weight.mul_(2)  # in place: the next call repacks
    torch.testing.assert_close(block.lone(x), torch.nn.functional.linear(x, block.lone.weight, block.lone.bias))
    twin = copy.deepcopy(block)
    with torch.no_grad():
        twin.lone.weight.mul_(3)
    torch.testing.assert_close(twin.lone(x), torch.nn.functional.linear(x, twin.lone.weight, twin.lone.bias))
    block.lone.weight.requires_grad_(True)  # trained: the plain matmul, with its weight gradient
    block.lone(x).sum().backward()
    assert block.lone.weight.grad is not None and block.lone.weight.grad.abs().max() > 0
    half = nn.Linear(16, 4).half().requires_grad_(False)  # float16: oneDNN's packing is not used
    assert runtime.pack_linears(half) == 1
    torch.testing.assert_close(half(x.detach().half()), torch.nn.functional.linear(x.detach().half(), half.weight, half.bias))
    assert half not in runtime._GROUPS
    y = torch.randn(3, 5, 16)
    for name, inp in (("q_proj", x), ("k_proj", y), ("v_proj", x), ("q_proj", y)):  # keys from another input
        out, ref = both(getattr(block, name), inp)
        torch.testing.assert_close(out, ref)
    assert runtime._GROUPS[block.k_proj] is not runtime._GROUPS[block.q_proj]  # not siblings here: each alone
    for name, inp in (("gate_proj", x), ("up_proj", y), ("gate_proj", x), ("up_proj", y)):  # a pair, the same way
        torch.testing.assert_close(*both(getattr(block, name), inp))
    assert runtime._GROUPS[block.gate_proj] is not runtime._GROUPS[block.up_proj]
    assert [m.__dict__.get("_promptlit_unpackable", False) for m in (block.q_proj, block.k_proj)] == [False, False]

def test_fused_norm_gradient_is_the_closed_form():
    """The fused norm's backward against numerical gradients, for the input and the weight."""
    from prompt_methods.runtime import _RMSNorm

    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w))
    out = _RMSNorm.apply(x, w, 1e-6)
    torch.testing.assert_close(out, w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_fused_norms_only_where_the_norm_is_the_same():
    """A norm that computes something else (Gemma's ``1 + weight``) keeps its own forward; a fused
    norm gives a bf16 input to its own forward; a deep copy's norms run on the copy's weights."""
    import copy

    from torch import nn

    from prompt_methods import runtime

    class PlainRMSNorm(nn.Module):
        def __init__(self, offset=0.0):
            super().__init__()
            self.weight, self.eps, self.offset = nn.Parameter(torch.rand(8) + 0.5), 1e-6, offset

        def forward(self, x):
            xf = x.float()
            out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (self.offset + self.weight) * out.to(x.dtype)

    class OffsetRMSNorm(PlainRMSNorm):
        def __init__(self):
            super().__init__(offset=1.0)

    model = nn.Sequential(PlainRMSNorm(), OffsetRMSNorm())
    assert runtime.fuse_norms(model) == 1
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
    x = torch.randn(2, 3, 8, requires_grad=True)
    assert "RMSNorm" in type(model[0](x).grad_fn).__name__
    half = x.detach().bfloat16()
    torch.testing.assert_close(model[0](half), PlainRMSNorm.forward(model[0], half), atol=0, rtol=0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.mul_(2)
    torch.testing.assert_close(twin[0](x), 2 * model[0](x))
    assert runtime.fuse_norms(twin) == 1  # already fused: counted, not wrapped again
