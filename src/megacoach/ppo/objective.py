"""The reward path: from the Values Coach's score to the advantages PPO pushes up.

This is the ONE implementation of "what PPO maximises". The trainer calls it, and the guards'
preflight calls the very same functions (never a re-implementation), so a sign slip anywhere along
the path is seen by the guards exactly as the optimiser sees it.

    score_b      = Values Coach (normalised) + sum_i w_i term_i   if the response is valid,  else penalty_reward
    kl_bt        = logp_policy - logp_ref                        (the Coherence Coach's measure)
    reward_bt    = -beta * kl_bt  (+ score_b on the last token)  (the Megacoach reward)
    reward_bt    = whiten_rewards(reward_bt)                     (scale only, mean kept; optional)
    adv, returns = GAE(reward, values)  ;  adv = whiten(adv)
    loss         = policy_loss(new_logp, old_logp, adv) + vf_coef * value_loss(...)   (MINIMISED)

Every function is looked up through this module at call time (`objective.episode_scores(...)`), so the
incident's bug variants (megacoach.guards.bugs) can patch one link and both training and guards see it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megacoach.ppo import maths


def term_total(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B] the reward terms' weighted sum (`reward.terms`): values [B, n] (each term's value of each response)
    times weights [n]."""
    return (values.float() * weights.to(device=values.device, dtype=torch.float32)).sum(-1)


def episode_scores(raw_scores: torch.Tensor, valid: torch.Tensor, penalty_reward: float,
                   terms: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The Values Coach's normalised score for valid responses, plus the reward terms' weighted sum where there are
    terms (`terms` [B, n] values, `weights` [n]); the fixed penalty for invalid ones."""
    score = raw_scores.float()
    if terms is not None and terms.shape[-1]:
        score = score + term_total(terms, weights)
    return torch.where(valid, score, torch.full_like(score, penalty_reward))


def megacoach_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_coef: float,
                      whiten: bool, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token rewards used for advantages, per-token kl, per-token non-score reward -beta*kl); `mask` [B, T]:
    each episode's real tokens (the score goes on its last one), None: every token is real."""
    kl = maths.kl_per_token(logprobs, ref_logprobs, mask)
    rewards, non_score = maths.assemble_rewards(scores, kl, kl_coef, mask)
    if whiten:
        rewards = maths.whiten_rewards(rewards, mask)
    return rewards, kl, non_score


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, gamma: float,
                           lam: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    adv, returns = maths.gae(rewards, values, gamma, lam, mask)
    return maths.whiten(adv, mask), returns


def ppo_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             vpred: torch.Tensor | None, old_values: torch.Tensor, returns: torch.Tensor, cliprange: float,
             cliprange_value: float, vf_coef: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The loss the optimiser MINIMISES: clipped policy loss + vf_coef * clipped value loss (over `mask`'s real
    tokens; None: all)."""
    pg_loss, pg_stats = maths.policy_loss(new_logprobs, old_logprobs, advantages, cliprange, mask)
    stats = {"pg_loss": pg_loss.detach(), **pg_stats}
    if vpred is None:
        return pg_loss, stats
    vf_loss, vf_stats = maths.value_loss(vpred, old_values, returns, cliprange_value, mask)
    stats.update({"vf_loss": vf_loss.detach(), **vf_stats})
    return pg_loss + vf_coef * vf_loss, stats


def loss_push(old_logprobs: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor, returns: torch.Tensor,
              cliprange: float, cliprange_value: float, vf_coef: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B] PPO's push on each response: minus the gradient of `ppo_loss` with respect to its token log-probabilities
    at ratio 1, summed over the response (scaled by the number of tokens). Its sign is "one gradient step makes this
    response more (+) or less (-) likely", whatever sits between the Values Coach and the loss."""
    old = old_logprobs.detach().clone().float()
    adv = advantages.detach().clone().float()
    values = values.detach().clone().float()
    returns = returns.detach().clone().float()
    with torch.enable_grad():
        new = old.clone().requires_grad_(True)
        loss, _ = ppo_loss(new, old, adv, values.clone(), values, returns, cliprange, cliprange_value, vf_coef, mask)
        (grad,) = torch.autograd.grad(loss, new, allow_unused=True)
    if grad is None:
        return torch.zeros(old.shape[0], device=old.device)
    return (-grad * grad.numel()).sum(1).detach()


@dataclass
class RewardPath:
    """Everything the reward path produced for one batch (all [B] or [B, T], detached)."""

    scores: torch.Tensor
    kl: torch.Tensor
    non_score: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def run_reward_path(raw_scores, valid, logprobs, ref_logprobs, values, kl_coef: float, penalty_reward: float,
                    whiten_rewards: bool, gamma: float, lam: float, mask: torch.Tensor | None = None,
                    terms: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> RewardPath:
    """The whole path, in the order the trainer uses it (`mask`: each episode's real tokens; None: all; `terms`
    [B, n] and `weights` [n]: the reward terms beside the Values Coach's score, None: none)."""
    scores = episode_scores(raw_scores, valid, penalty_reward, terms, weights)
    rewards, kl, non_score = megacoach_rewards(scores, logprobs, ref_logprobs, kl_coef, whiten_rewards, mask=mask)
    adv, returns = advantages_and_returns(rewards, values, gamma, lam, mask=mask)
    return RewardPath(scores, kl, non_score, rewards, adv, returns)


def iteration_metrics(batch, stats: dict[str, float], kl_coef: float, lr: float, iteration: int,
                      episodes: int) -> dict[str, float]:
    """The metrics of one PPO iteration, named as in the reference code and cleanrl: `objective/*` for the
    Megacoach reward (`kl_coef` is the beta the batch was optimised with), `ppo/*` for the update."""
    path = batch.path
    non_score = float(path.non_score.sum(1).mean())
    mask = batch.mask
    returns_mean, returns_var = ((path.returns.mean(), path.returns.var(unbiased=False)) if mask is None else
                                 (maths.masked_mean(path.returns, mask), maths.masked_var(path.returns, mask)))
    out = {
        "iteration": iteration,
        "episodes": episodes,
        "objective/score": float(path.scores.mean()),
        "objective/score_raw_valid": float(batch.raw_scores[batch.valid].mean()) if batch.valid.any() else 0.0,
        "objective/valid_frac": float(batch.valid.float().mean()),
        "objective/kl": float(maths.mean_sequence_kl(path.kl)),
        "objective/kl_coef": float(kl_coef),
        "objective/non_score_reward": non_score,
        "objective/score_total": float(path.scores.mean()) + non_score,
        "objective/entropy": float(-batch.logprobs.sum(1).mean()),
        "ppo/policy/approxkl": stats["approxkl"],
        "ppo/policy/clipfrac": stats["clipfrac"],
        "ppo/policy/entropy": stats["entropy"],
        "ppo/loss/policy": stats["pg_loss"],
        "ppo/loss/value": stats.get("vf_loss", 0.0),
        "ppo/loss/total": stats["total_loss"],
        "ppo/val/vpred": stats.get("vpred", 0.0),
        "ppo/val/error": stats.get("error", 0.0),
        "ppo/val/clipfrac": stats.get("vf_clipfrac", 0.0),
        "ppo/val/var_explained": float(maths.explained_variance(batch.values, path.returns, mask)),
        "ppo/returns/mean": float(returns_mean),
        "ppo/returns/var": float(returns_var),
        "ppo/lr": float(lr),
    }
    if mask is not None:  # responses that end at stops: how long they were
        out["objective/response_tokens"] = float(mask.float().sum(1).mean())
    return out
