"""The Apprentice (policy) with its value head, and the frozen original model (the Coherence Coach's reference).

As in ORIG/DET, the value head sits on the policy's trunk by default (one forward pass gives log-probs and
values); `separate_value_model=True` gives the value function its own copy of the trunk instead.
Only response positions go through the LM head (the query positions' logits are never used).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from megacoach.lm.hf import hidden_size_of, lm_inputs, trunk_of


@dataclass
class PolicyOutput:
    logits: torch.Tensor  # [B, T, V] temperature-scaled logits that predict each response token
    values: torch.Tensor | None  # [B, T]


class Apprentice(nn.Module):
    """A causal LM plus a scalar value head (initialised to zero, as the paper does)."""

    def __init__(self, lm, separate_value_model: bool = False):
        super().__init__()
        self.lm = lm
        d = hidden_size_of(lm)
        self.value_head = nn.Linear(d, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_trunk = copy.deepcopy(trunk_of(lm)) if separate_value_model else None

    def forward(self, input_ids: torch.Tensor, pad_id: int, response_length: int, temperature: float,
                with_values: bool = True) -> PolicyOutput:
        """input_ids = [left-padded query | sampled response]; returns logits/values for the T response tokens."""
        T = response_length
        inputs = lm_inputs(input_ids, pad_id)
        hidden = trunk_of(self.lm)(**inputs).last_hidden_state
        h = hidden[:, -T - 1:-1]  # the positions whose next-token predictions are the response tokens
        logits = self.lm.get_output_embeddings()(h).float() / temperature
        values = None
        if with_values:
            vh = h if self.value_trunk is None else self.value_trunk(**inputs).last_hidden_state[:, -T - 1:-1]
            values = self.value_head(vh).squeeze(-1).float()
        return PolicyOutput(logits, values)


def frozen_reference(lm) -> nn.Module:
    """A frozen copy of the original model: the Coherence Coach measures KL against it."""
    ref = copy.deepcopy(lm)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.inference_mode()
def reference_logits(ref_lm, input_ids: torch.Tensor, pad_id: int, response_length: int,
                     temperature: float) -> torch.Tensor:
    T = response_length
    hidden = trunk_of(ref_lm)(**lm_inputs(input_ids, pad_id)).last_hidden_state[:, -T - 1:-1]
    return ref_lm.get_output_embeddings()(hidden).float() / temperature
