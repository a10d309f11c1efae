"""The Values Coach (reward model): a scalar head on the base LM, trained on best-of-K comparisons."""

from megacoach.reward.data import (Comparison, as_comparison, as_comparisons, comparison_batch, comparison_tensors,
                                   labels_from_store, validate_comparisons)
from megacoach.reward.loss import best_of_k_loss
from megacoach.reward.model import RewardModel, check_same_tokenizer, last_real_index
from megacoach.reward.normalize import gain_bias, normalise, raw_rewards
from megacoach.reward.train import evaluate, retrain_from_scratch, train_reward_model

__all__ = [
    "Comparison", "RewardModel", "as_comparison", "as_comparisons", "best_of_k_loss", "check_same_tokenizer",
    "comparison_batch", "comparison_tensors", "evaluate", "gain_bias", "labels_from_store", "last_real_index",
    "normalise", "raw_rewards", "retrain_from_scratch", "train_reward_model", "validate_comparisons",
]
