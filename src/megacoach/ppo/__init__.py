"""PPO for the Apprentice: pure maths (maths.py), the Coherence Coach's weight (kl_control.py),
the TF-style Adam and LR decay (optim.py), and the training loop (trainer.py)."""

from megacoach.ppo.kl_control import AdaptiveKLController, FixedKLController, KLController, make_kl_controller
from megacoach.ppo.maths import (
    assemble_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_per_token,
    last_true_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    mean_sequence_kl,
    policy_loss,
    value_loss,
    whiten,
    whiten_rewards,
)
from megacoach.ppo.optim import AdamTFStyle, linear_decay

__all__ = [
    "AdamTFStyle",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "assemble_rewards",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_per_token",
    "last_true_index",
    "linear_decay",
    "logprobs_from_logits",
    "make_kl_controller",
    "masked_mean",
    "masked_var",
    "mean_sequence_kl",
    "policy_loss",
    "value_loss",
    "whiten",
    "whiten_rewards",
]
