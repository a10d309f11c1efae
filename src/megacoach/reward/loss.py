"""The Values Coach's loss: softmax cross-entropy over the K rewards of a comparison (pure).

    loss = mean_b [ -log softmax(rewards_b)[chosen_b] ]

For K = 2 this is the Bradley-Terry loss -log sigmoid(r_chosen - r_other). Accuracy counts a comparison
as right when the chosen sample has the strictly highest reward (ties count as wrong: a model that
scores everything equally is not credited with anything).

Every agreement figure is reported beside the same figure with each comparison's choice reversed (`reversed_choices`:
K = 2, the other sample; K > 2, each other sample in turn, averaged). A figure that reads the labels the right way
falls below chance when they are reversed; one that does not (`blind_to_direction`) measures something other than
agreement with the labelers (a metric blind to the choice, as a reward model's eval accuracy that stays 1.0 after
chosen and rejected are swapped) and is refused, not reported as agreement.
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


def reversed_choices(chosen: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Each comparison's choice reversed: for K = 2 the other sample ([chosen ^ 1]); for K > 2 every other sample in
    turn (K - 1 tensors, the j-th moving each choice j places on)."""
    return [(chosen + j) % k for j in range(1, k)]


def blind_to_direction(accuracy: float, reversed_acc: float, chance: float) -> bool:
    """Whether an agreement figure ignores which sample the labelers chose: above chance read as stored AND not below
    chance with every choice reversed (a figure that reads the choice cannot be both)."""
    return accuracy > chance and reversed_acc >= chance
