"""How megacoach talks to a Hugging Face causal LM: left padding and position ids (as the paper's code does them,
so padding never changes logits), the model's transformer trunk and width, and its KV cache."""

from __future__ import annotations

import torch
from torch import nn

CACHE_KW = "cache"  # transformers >= 5.2x names the KV cache argument `cache` (formerly `past_key_values`)


def left_pad(sequences: list[list[int]], pad_id: int, length: int | None = None) -> torch.Tensor:
    """Left-pad token lists to `length` (default: the longest); longer sequences keep their last tokens."""
    length = length or max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        s = s[-length:] if length else []
        if s:
            out[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids = cumsum(mask) - mask: real tokens count 0, 1, 2, ... whatever padding precedes them."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - mask).clamp(min=0)


def lm_inputs(input_ids: torch.Tensor, pad_id: int) -> dict:
    """Model kwargs for a left- (or right-) padded batch: attention mask and shifted position ids."""
    mask = (input_ids != pad_id).long()
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}


def forward(model, input_ids: torch.Tensor, pad_id: int, **kwargs):
    """One forward pass of any HF causal LM (or its trunk) over a padded batch."""
    return model(**lm_inputs(input_ids, pad_id), **kwargs)


def trunk_of(lm) -> nn.Module:
    """The transformer body of a HF causal LM (GPT-2: `.transformer`; most others: `.model`)."""
    return lm.get_decoder() if hasattr(lm, "get_decoder") and lm.get_decoder() is not None else lm.base_model


def hidden_size_of(lm) -> int:
    cfg = lm.config
    return getattr(cfg, "n_embd", None) or getattr(cfg, "hidden_size")


def cache_of(out):
    """The KV cache a forward pass with `use_cache=True` returned (under either name)."""
    return out.get(CACHE_KW, out.get("past_key_values"))
