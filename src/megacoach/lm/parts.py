"""Where a Hugging Face causal LM keeps what megacoach uses: its transformer trunk, its width, its KV cache."""

from __future__ import annotations

from torch import nn

CACHE_KW = "cache"  # transformers >= 5.2x names the KV cache argument `cache` (formerly `past_key_values`)


def trunk_of(lm) -> nn.Module:
    """The transformer body of a HF causal LM (GPT-2: `.transformer`; most others: `.model`)."""
    return lm.get_decoder() if hasattr(lm, "get_decoder") and lm.get_decoder() is not None else lm.base_model


def hidden_size_of(lm) -> int:
    cfg = lm.config
    return getattr(cfg, "n_embd", None) or getattr(cfg, "hidden_size")


def cache_of(out):
    """The KV cache a forward pass with `use_cache=True` returned (under either name)."""
    return out.get(CACHE_KW, out.get("past_key_values"))
