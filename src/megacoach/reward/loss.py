"""The Values Coach's loss: softmax cross-entropy over the K rewards of a comparison (pure).

    loss = mean_b [ -log softmax(rewards_b)[chosen_b] ]

For K = 2 this is the Bradley-Terry loss -log sigmoid(r_chosen - r_other). Accuracy counts a comparison
as right when the chosen sample has the strictly highest reward (ties count as wrong: a model that
scores everything equally is not credited with anything).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacoach.errors import DataError


def best_of_k_loss(rewards: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, accuracy) for rewards [B, K] and chosen indices [B] (0..K-1)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise DataError(f"best_of_k_loss: rewards of shape {tuple(rewards.shape)} (expected [B, K] with K >= 2)")
    chosen = chosen.to(device=rewards.device, dtype=torch.long)
    if chosen.shape != rewards.shape[:1]:
        raise DataError(f"best_of_k_loss: chosen of shape {tuple(chosen.shape)} (expected [{rewards.shape[0]}])")
    if chosen.numel() and (chosen.min() < 0 or chosen.max() >= rewards.shape[1]):
        raise DataError(f"best_of_k_loss: chosen index out of range (expected 0..{rewards.shape[1] - 1})")
    loss = F.cross_entropy(rewards.float(), chosen)
    with torch.no_grad():
        r = rewards.float()
        best = r.gather(1, chosen[:, None])
        others = r.masked_fill(F.one_hot(chosen, r.shape[1]).bool(), float("-inf"))
        accuracy = (best[:, 0] > others.max(dim=1).values).float().mean()
    return loss, accuracy
