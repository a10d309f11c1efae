"""PPO for the Apprentice, one room per job: the reward path from score to loss with its sign convention
(objective.py), the Apprentice, its response heads and the original model (policy.py), the rollout that builds
each batch of episodes (episodes.py), the Coherence Coach's weight (kl_control.py), the TF-style Adam and LR decay
(optim.py), and the training loop (trainer.py)."""

from megacoach.ppo.kl_control import AdaptiveKLController, FixedKLController, KLController, make_kl_controller
from megacoach.ppo.objective import (
    assemble_rewards,
    explained_variance,
    gae,
    kl_per_token,
    last_true_index,
    masked_mean,
    masked_var,
    mean_sequence_kl,
    policy_loss,
    value_loss,
    whiten,
    whiten_rewards,
)
from megacoach.ppo.optim import AdamTFStyle, linear_decay
from megacoach.ppo.policy import entropy_from_logits, logprobs_from_logits
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
