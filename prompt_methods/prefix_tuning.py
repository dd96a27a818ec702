"""Prefix tuning and its deep-prompt variant, P-tuning v2.

"Prefix-Tuning: Optimizing Continuous Prompts for Generation" (Li & Liang, arXiv:2101.00190);
"P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales and Tasks"
(Liu et al., arXiv:2110.07602).

Every layer gets P learned key/value vectors, handed to the backbone as a transformers
``DynamicCache`` that the real tokens attend to. With ``reparameterize`` they come from an MLP over
P embeddings (Li & Liang); without it they are free parameters (P-tuning v2).
"""

from __future__ import annotations

import torch
from torch import nn

from prompt_methods.backbone import BackboneError
from prompt_methods.base import PromptModule
from prompt_methods.peft_format import check_adapter, read_adapter
from prompt_methods.prompt_cache import cache_keyword, expanded_cache, new_cache
from prompt_methods.readout import Feed


class PrefixTuning(PromptModule):
    """Per-layer key/value prefixes.

    Args:
        num_virtual_tokens: P, prefix length.
        reparameterize: produce the prefix with an MLP (Li & Liang) instead of free parameters (P-tuning v2).
        mlp_hidden: hidden width of the reparameterization MLP.
        init: ``random`` or ``text``: start from the keys/values the backbone itself computes for ``init_text``
            (with the MLP, its last layer starts at zero so the prefix starts exactly there). A random
            prefix can wreck an instruct model's zero-shot ability.
        init_text: the text for ``init: text``, cut or repeated to P tokens.
        adapter: a PEFT prefix-tuning adapter folder to start from (P then comes from it).
        **kwargs: the rest of :class:`PromptModule`.

    Trainable parameters, with L layers, kv width D = 2 * kv_heads * head_dim * L:
    ``P * D`` without the MLP; ``P*H + H*M + M + M*D + D`` with it (M = mlp_hidden).
    """

    method_params = ("prefix",)
    compile_attention = False  # the prefix cache's per-layer bookkeeping recompiles every layer

    def __init__(self, num_virtual_tokens: int = 10, reparameterize: bool = False, mlp_hidden: int = 512,
                 init: str = "text", init_text: str | None = "Classify the text.", adapter: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if self.kind == "seq2seq" or cache_keyword(self.backbone.base_model) is None:
            raise BackboneError(
                f"model.class_path: PrefixTuning needs a decoder or encoder backbone that takes a key/value cache; "
                f"{type(self.backbone).__name__} ({self.kind}) does not"
            )
        if num_virtual_tokens < 1:
            raise ValueError(f"model.init_args.num_virtual_tokens must be at least 1, not {num_virtual_tokens}")
        if init not in ("random", "text") or (init == "text" and not init_text):
            raise ValueError("model.init_args.init must be random, or text with model.init_args.init_text set")
        cfg = self.backbone.config.get_text_config()
        self.n_layers = cfg.num_hidden_layers
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_prefix = num_virtual_tokens
        width = 2 * self.n_layers * self.n_kv * self.head_dim  # D: keys and values of every layer
        if adapter:  # PEFT's PREFIX_TUNING prompt_embeddings: the same (P, D) layout
            if reparameterize:
                raise ValueError("model.init_args.adapter: an imported prefix is its trained keys/values; set reparameterize: false")
            config, start = read_adapter(adapter)
            self.n_prefix = num_virtual_tokens = check_adapter(config, start, ("PREFIX_TUNING",), width, self.n_layers)
        elif init == "text":
            start = self._text_kv(init_text)
        else:
            start = torch.randn(num_virtual_tokens, width) * 0.02
        self.prefix = nn.Module()
        if reparameterize:
            self.prefix.embedding = nn.Parameter(torch.randn(num_virtual_tokens, cfg.hidden_size) * 0.02)
            self.prefix.mlp = nn.Sequential(nn.Linear(cfg.hidden_size, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, width))
            if init == "text":
                nn.init.zeros_(self.prefix.mlp[-1].weight)
                nn.init.zeros_(self.prefix.mlp[-1].bias)
            self.prefix.register_buffer("base", start)  # (P, D) fixed start
        else:
            self.prefix.kv = nn.Parameter(start)  # (P, D)

    @torch.no_grad()
    def _text_kv(self, text: str) -> torch.Tensor:
        """The (P, D) keys/values the frozen backbone computes for ``text`` (cut or repeated to P tokens)."""
        ids = self.text_ids(text, self.n_prefix).unsqueeze(0)
        cache = new_cache(self.backbone, self.kind)
        self.backbone.base_model(input_ids=ids, use_cache=True, **{cache_keyword(self.backbone.base_model): cache})  # fills it
        keys = [layer.keys[0] for layer in cache.layers]  # L x (kv, P, hd)
        values = [layer.values[0] for layer in cache.layers]
        kv = torch.stack([torch.stack(keys), torch.stack(values)], 1)  # (L, 2, kv, P, hd)
        return kv.permute(3, 0, 1, 2, 4).reshape(self.n_prefix, -1).float()  # (P, D)

    def prefix_kv(self) -> torch.Tensor:
        if hasattr(self.prefix, "mlp"):
            return self.prefix.base + self.prefix.mlp(self.prefix.embedding)
        return self.prefix.kv  # (P, D)

    def build_cache(self, batch_size: int, dtype: torch.dtype):
        """A fresh cache holding the prefix for every layer, expanded over the batch."""
        kv = self.prefix_kv().to(dtype).view(self.n_prefix, self.n_layers, 2, self.n_kv, self.head_dim)
        kv = kv.permute(1, 2, 3, 0, 4).unsqueeze(2)  # (L, 2, 1, kv, P, hd)
        return expanded_cache(self.backbone, self.kind, [(kv[i, 0], kv[i, 1]) for i in range(self.n_layers)], batch_size)

    def feed(self, batch) -> Feed:
        if (batch["soft_index"] >= 0).any():
            raise ValueError("data.init_args.template has {soft} slots, which PrefixTuning does not fill; remove them")
        embeds = self.embed(batch)  # (B, T, H)
        mask = batch["attention_mask"]
        B = embeds.size(0)
        full_mask = torch.cat([mask.new_ones(B, self.n_prefix), mask], 1)  # (B, P + T)
        # real tokens continue after the prefix positions, as a transformers model numbers tokens after a
        # cache (BERT too: P-tuning v2's reference code and PEFT's prefix adapters on encoders)
        return Feed(embeds, full_mask, batch["answer_pos"], self.position_ids(mask, self.n_prefix),
                    self.build_cache(B, embeds.dtype))
