"""The reward path: from the Values Coach's score to the loss PPO minimises, top to bottom in one file.

This is the ONE implementation of "what PPO maximises". The trainer calls it, and the guards' preflight calls
the very same functions (never a re-implementation), so a sign slip anywhere along the path is seen by the
guards exactly as the optimiser sees it. Small functions on tensors, no models, no side effects.

Sign convention (one, used by every function here and everywhere in megacoach)
------------------------------------------------------------------------------
* Rewards are what PPO MAXIMISES. A larger reward means "do more of this".
* ``score`` is the Values Coach output after normalisation (higher = more preferred by people) plus the reward
  terms' weighted sum (``reward.terms``: ``sum_i w_i term_i``), or the fixed invalid-response penalty (e.g. -1)
  when the response lacks its stop token.
* ``kl_t = logp_policy_t - logp_ref_t`` per response token (the k1 estimator, as ORIG); it is >= 0
  in expectation under the policy. This is what the Coherence Coach penalises.
* The Megacoach reward per token is ``r_t = -kl_coef * kl_t``, and ``score`` is ADDED on the last
  real response token: ``R = score - kl_coef * sum_t kl_t`` per episode.
* Advantages are "how much better than expected": positive advantage -> make that token MORE likely.
* The policy loss that is MINIMISED is ``-min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)``, averaged
  over real tokens. The value loss is ``0.5 * mean(max((v-R)^2, (clip(v, v_old +- eps) - R)^2))``.

A sign slip anywhere along that chain is the section 4.4 incident of the paper; tests in
tests/test_ppo_maths.py pin every link of it.

The path, in the order of this file
-----------------------------------
    1. score_b      = Values Coach (normalised)  if the response is valid,  else penalty_reward
    2. kl_bt        = logp_policy - logp_ref                        (the Coherence Coach's measure)
    3. reward_bt    = -beta * kl_bt  (+ score_b on the last token)  (the Megacoach reward)
       reward_bt    = whiten_rewards(reward_bt)                     (scale only, mean kept, over the whole
                                                                     rollout batch; optional)
    4. adv, returns = GAE(reward, values)  ;  adv = whiten(adv)     (over the whole rollout batch)
    5. loss         = policy_loss(new_logp, old_logp, adv) + vf_coef * value_loss(...)   (MINIMISED)

The rollout runs steps 1-4 once per batch (`run_reward_path`); the update runs step 5 on each minibatch.
Every link is looked up through this module at call time (the trainer calls `objective.ppo_loss(...)`, and
`megacoach_rewards` finds `assemble_rewards` in this module's namespace when it runs), so the incident's bug
variants (megacoach.guards.bugs) can patch one link and both training and guards see it.

Shapes and masks
----------------
``B`` = batch (episodes), ``T`` = response tokens. ``mask`` is ``[B, T]`` (bool, int or float), 1 for real
response tokens and 0 for padding after truncation; it is always optional, and ``None`` means every token is
real (ORIG trains on all sampled tokens). Functions that reduce ignore masked entries; functions that return
``[B, T]`` tensors return 0 at masked entries. Masked entries may hold anything (even inf or NaN): they are
selected away with ``torch.where``, never multiplied by 0, so they never leak NaN into results or gradients.
On the paper's task the trainer passes no mask: its responses are exactly ``response_length`` sampled tokens, all
of them trained on. With stops (``task.stop``, ``task.stop_at_eos``) responses end early and the positions after
the stop are padding, not sampled: the trainer passes each episode's mask (ppo/episodes.py ``response_mask``);
tests/test_ppo_maths.py pins the masks, tests/test_instruct.py the trainer's use of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megacoach.errors import DataError

WHITEN_EPS = 1e-8  # as ORIG's whiten: (x - mean) * rsqrt(var + 1e-8)


# --------------------------------------------------------------------------- masked statistics


def _bool_mask(mask: torch.Tensor | None, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` as a bool tensor shaped like ``like`` (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    if tuple(mask.shape) != tuple(like.shape):
        raise DataError(f"{name}: expected shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask.to(device=like.device) != 0


def _check_shape(t: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise DataError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _zero_where_masked(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    Args:
        x: any shape.
        mask: same shape as ``x`` or None (all entries count).
        dim: reduce over these dims; None reduces over everything (a 0-d tensor).

    Returns:
        The masked mean. An empty selection (all masked) gives 0, not NaN.
    """
    m = _bool_mask(mask, x)
    xs = _zero_where_masked(x, m)
    if dim is None:
        return xs.sum() / m.sum().clamp(min=1).to(x.dtype)
    return xs.sum(dim=dim) / m.sum(dim=dim).clamp(min=1).to(x.dtype)


def masked_var(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    dim: int | tuple[int, ...] | None = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask`` is 1.

    Biased (divide by n) by default, as TF's ``tf.nn.moments`` which ORIG uses; ``unbiased=True``
    divides by n-1 (with n-1 clamped to >= 1). An empty selection gives 0.

    Args:
        x: any shape; mask: same shape or None; dim: as in :func:`masked_mean`.
    """
    m = _bool_mask(mask, x)
    mean = masked_mean(x, m, dim=dim)
    if dim is not None:
        mean = mean.unsqueeze(dim) if isinstance(dim, int) else _unsqueeze_dims(mean, dim, x.dim())
    sq = _zero_where_masked((x - mean) ** 2, m)
    n = m.sum() if dim is None else m.sum(dim=dim)
    n = n.to(x.dtype)
    total = sq.sum() if dim is None else sq.sum(dim=dim)
    if unbiased:
        return total / (n - 1).clamp(min=1)
    return total / n.clamp(min=1)


def _unsqueeze_dims(t: torch.Tensor, dims: tuple[int, ...], ndim: int) -> torch.Tensor:
    for d in sorted(d % ndim for d in dims):
        t = t.unsqueeze(d)
    return t


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a ``[B, T]`` mask, as a ``[B]`` long tensor.

    Raises:
        DataError: a row has no 1 at all (an episode without a single real token cannot carry a
            score; silently dropping its score, e.g. the -1 penalty, would hide a bug upstream).
    """
    if mask.dim() != 2:
        raise DataError(f"mask: expected shape [B, T], got {tuple(mask.shape)}")
    m = mask != 0
    empty = ~m.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise DataError(f"mask: rows {rows} have no real response token; each episode needs at least one")
    t = mask.shape[1]
    # position of the first True in the row reversed -> last True in the row
    return (t - 1 - torch.flip(m, dims=[1]).to(torch.int8).argmax(dim=1)).long()


# --------------------------------------------------------------------------- 1. the score


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


# --------------------------------------------------------------------------- 2. the Coherence Coach's KL


def kl_per_token(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor | None = None,
    estimator: Literal["k1", "k3"] = "k1",
) -> torch.Tensor:
    """Per-token KL estimate between the Apprentice (policy) and the reference model.

    * ``"k1"`` (default, what ORIG optimises and logs): ``kl_t = logp_t - ref_logp_t``. Unbiased for
      KL(policy || ref) when tokens are sampled from the policy; single tokens can be negative.
    * ``"k3"`` (for logging comparisons only): with ``log r = ref_logp - logp``,
      ``kl_t = (r - 1) - log r`` >= 0 per token, also unbiased, lower variance. Do not put it in the
      reward unless you mean to change the method.

    Args:
        logp, ref_logp: ``[B, T]`` log-probs of the sampled tokens under policy and reference.
        mask: ``[B, T]`` or None.

    Returns:
        ``[B, T]``, 0 at masked entries.
    """
    _check_shape(ref_logp, tuple(logp.shape), "ref_logp")
    m = _bool_mask(mask, logp)
    diff = _zero_where_masked(logp - ref_logp, m)
    if estimator == "k1":
        return diff
    if estimator == "k3":
        log_r = -diff
        return _zero_where_masked(torch.expm1(log_r) - log_r, m)
    raise DataError(f"estimator: expected 'k1' or 'k3', got {estimator!r}")


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` the k1 KL of each episode, summed over its response: ``sum_t (logp_t - ref_logp_t)``."""
    return kl_per_token(logp, ref_logp, mask).sum(dim=1)


def mean_sequence_kl(kl: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of the per-episode summed KL: ``mean_b sum_t kl[b, t]`` (0-d tensor).

    This is ORIG's ``objective/kl`` and the number the adaptive KL controller is fed.
    """
    m = _bool_mask(mask, kl)
    return _zero_where_masked(kl, m).sum(dim=1).mean()


# --------------------------------------------------------------------------- 3. the Megacoach reward


def assemble_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: float | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Megacoach reward per token: ``-kl_coef * kl_t``, plus ``score`` on the last real token.

    Args:
        score: ``[B]`` normalised Values Coach score, or the invalid-response penalty (e.g. -1).
            Higher is better.
        kl: ``[B, T]`` per-token ``logp_policy - logp_ref`` (see :func:`kl_per_token`).
        kl_coef: beta >= 0, the Coherence Coach's weight (a float or 0-d tensor). Not validated here
            (the KL controllers validate it), so a guard can build deliberately wrong variants.
        mask: ``[B, T]`` or None. The score goes on the last position where the mask is 1 (the
            last column when None, as ORIG's ``rewards[:, -1] += scores``).

    Returns:
        ``(rewards, non_score_reward)``, both ``[B, T]`` and 0 at masked entries;
        ``non_score_reward = -kl_coef * kl`` and ``rewards = non_score_reward + score at the end``.

    Raises:
        DataError: shapes disagree, or a row of ``mask`` has no real token (the score would be lost).
    """
    if kl.dim() != 2:
        raise DataError(f"kl: expected shape [B, T], got {tuple(kl.shape)}")
    _check_shape(score, (kl.shape[0],), "score")
    m = _bool_mask(mask, kl)
    non_score = _zero_where_masked(-kl_coef * kl, m)
    last = last_true_index(m)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards = non_score.clone()
    rewards[rows, last] = rewards[rows, last] + score.to(rewards.dtype)
    return rewards, non_score


def whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = WHITEN_EPS
) -> torch.Tensor:
    """Whiten over all (real) entries of ``x``: ``(x - mean) * rsqrt(var + eps)``, as ORIG.

    The mean and the BIASED variance (as TF's ``tf.nn.moments``) are taken over every real entry of
    the whole tensor (not per row). With ``shift_mean=False`` the mean is added back afterwards:
    ``(x - mean) / std + mean`` -- the spread is normalised, the mean is kept (ORIG's reward scaling).

    Args:
        x: any shape (``[B, T]`` in PPO). mask: same shape or None. eps: 1e-8 as ORIG.

    Returns:
        Same shape as ``x``; 0 at masked entries.
    """
    m = _bool_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_where_masked(out, m)


def whiten_rewards(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The reward scaling (``ppo.whiten_rewards=True``): rewards whitened with the mean kept, i.e.
    ``whiten(rewards, mask, shift_mean=False)``.

    megacoach applies it ONCE PER ROLLOUT BATCH: to the whole batch's ``[B, T]`` per-token rewards, right
    before GAE (`run_reward_path`), and the advantages are whitened over the same whole batch; every
    minibatch of the update then reads its rows of those. ORIG whitens rewards and advantages inside each
    minibatch; with the paper's settings (one minibatch per batch) the two are the same, and with several
    minibatches megacoach's statistics come from more episodes. It does not change the sign of anything:
    the mean reward is unchanged, deviations from it are rescaled by a positive factor.
    """
    return whiten(rewards, mask, shift_mean=False)


def megacoach_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_coef: float,
                      whiten: bool, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token rewards used for advantages, per-token kl, per-token non-score reward -beta*kl); `mask` [B, T]:
    each episode's real tokens (the score goes on its last one), None: every token is real."""
    kl = kl_per_token(logprobs, ref_logprobs, mask)
    rewards, non_score = assemble_rewards(scores, kl, kl_coef, mask)
    if whiten:
        rewards = whiten_rewards(rewards, mask)
    return rewards, kl, non_score


# --------------------------------------------------------------------------- 4. advantages


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens, as ORIG.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` after the last real token taken as 0
    (episodes end there: no bootstrapping), ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``returns_t = A_t + V_t``. Inputs are detached: advantages and returns are constants for PPO.
    Advantages are NOT whitened here (the trainer does ``whiten(advantages, mask)``).

    Args:
        rewards: ``[B, T]`` per-token rewards (e.g. from :func:`assemble_rewards`, maybe scaled by
            :func:`whiten_rewards`).
        values: ``[B, T]`` the value head's estimates at rollout time.
        gamma, lam: 1.0 and 0.95 in ORIG.
        mask: ``[B, T]`` or None; must be a prefix mask (1s then trailing 0s) in every row. Rewards
            and values at padded entries are ignored.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` and 0 at masked entries.

    Raises:
        DataError: shapes disagree, or the mask has a 0 followed by a 1 (not trailing padding).
    """
    if rewards.dim() != 2:
        raise DataError(f"rewards: expected shape [B, T], got {tuple(rewards.shape)}")
    _check_shape(values, tuple(rewards.shape), "values")
    m = _bool_mask(mask, rewards)
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise DataError("mask: expected trailing padding only (1s then 0s in each row), found a 0 before a 1")
    r = _zero_where_masked(rewards.detach(), m)
    v = _zero_where_masked(values.detach(), m)
    t_len = r.shape[1]
    last_gae = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    reversed_adv = []
    for t in reversed(range(t_len)):
        next_v = v[:, t + 1] if t + 1 < t_len else torch.zeros_like(last_gae)  # 0 after the end
        delta = r[:, t] + gamma * next_v - v[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    # padded entries are already exactly 0 (r = v = 0 there and nothing real follows them)
    advantages = _zero_where_masked(advantages, m)
    returns = _zero_where_masked(advantages + v, m)
    return advantages, returns


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, gamma: float,
                           lam: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages whitened over every real token of the batch given, returns): GAE, then `whiten`."""
    adv, returns = gae(rewards, values, gamma, lam, mask)
    return whiten(adv, mask), returns


# --------------------------------------------------------------------------- 5. the loss


def policy_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip: float = 0.2,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, as a loss to MINIMISE.

    ``ratio = exp(new_logp - old_logp)``;
    ``loss = mean(-min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A))`` over real tokens
    (ORIG writes it as ``mean(max(-A * ratio, -A * clipped_ratio))``, the same thing).
    Gradient descent on it raises ``new_logp`` where ``A > 0`` and lowers it where ``A < 0``.

    Args:
        new_logp: ``[B, T]`` log-probs under the policy being trained (carries the gradient).
        old_logp: ``[B, T]`` log-probs at rollout time (treated as constants).
        advantages: ``[B, T]`` (usually whitened; treated as constants).
        clip: the clip range epsilon, 0.2 in ORIG.
        mask: ``[B, T]`` or None.

    Returns:
        ``(loss, stats)``: ``loss`` a 0-d tensor; ``stats`` detached 0-d tensors:
        ``approxkl`` = ``0.5 * mean((new - old)^2)`` (as ORIG), ``clipfrac`` = fraction of tokens
        where the clipped term was chosen (strictly), ``ratio_mean`` = mean ratio.
    """
    _check_shape(old_logp, tuple(new_logp.shape), "old_logp")
    _check_shape(advantages, tuple(new_logp.shape), "advantages")
    m = _bool_mask(mask, new_logp)
    log_ratio = _zero_where_masked(new_logp - old_logp.detach(), m)
    adv = _zero_where_masked(advantages.detach(), m)
    ratio = torch.exp(log_ratio)
    losses_unclipped = -adv * ratio
    losses_clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(losses_unclipped, losses_clipped)
    loss = masked_mean(per_token, m)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, m),
            "clipfrac": masked_mean((losses_clipped > losses_unclipped).to(ratio.dtype), m),
            "ratio_mean": masked_mean(ratio.detach(), m),
        }
    return loss, stats


def value_loss(
    vpred: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip: float = 0.2,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, as ORIG: ``0.5 * mean(max((v - R)^2, (clip(v, v_old +- clip) - R)^2))``.

    Args:
        vpred: ``[B, T]`` value head output now (carries the gradient).
        old_values: ``[B, T]`` value estimates at rollout time (constants).
        returns: ``[B, T]`` GAE returns (constants).
        clip: 0.2 in ORIG (``cliprange_value``).
        mask: ``[B, T]`` or None.

    Returns:
        ``(loss, stats)`` with detached 0-d stats: ``vf_clipfrac`` = fraction of tokens where the
        clipped error was strictly larger, ``error`` = ``mean((vpred - R)^2)`` (unclipped),
        ``vpred`` = mean value prediction.
    """
    _check_shape(old_values, tuple(vpred.shape), "old_values")
    _check_shape(returns, tuple(vpred.shape), "returns")
    m = _bool_mask(mask, vpred)
    v = _zero_where_masked(vpred, m)
    v_old = _zero_where_masked(old_values.detach(), m)
    ret = _zero_where_masked(returns.detach(), m)
    v_clipped = torch.clamp(v, v_old - clip, v_old + clip)
    err_unclipped = (v - ret) ** 2
    err_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), m)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((err_clipped > err_unclipped).to(v.dtype), m),
            "error": masked_mean(err_unclipped.detach(), m),
            "vpred": masked_mean(v.detach(), m),
        }
    return loss, stats


def ppo_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             vpred: torch.Tensor | None, old_values: torch.Tensor, returns: torch.Tensor, cliprange: float,
             cliprange_value: float, vf_coef: float, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The loss the optimiser MINIMISES: clipped policy loss + vf_coef * clipped value loss (over `mask`'s real
    tokens; None: all)."""
    pg_loss, pg_stats = policy_loss(new_logprobs, old_logprobs, advantages, cliprange, mask)
    stats = {"pg_loss": pg_loss.detach(), **pg_stats}
    if vpred is None:
        return pg_loss, stats
    vf_loss, vf_stats = value_loss(vpred, old_values, returns, cliprange_value, mask)
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


# --------------------------------------------------------------------------- the whole path; the metrics


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
    """Steps 1-4, in the order the trainer uses them, once for the whole rollout batch (`mask`: each episode's real
    tokens; None: all): the reward scaling and the advantages' whitening take their statistics over all of it.
    `terms` [B, n] and `weights` [n]: the reward terms beside the Values Coach's score (None: none)."""
    scores = episode_scores(raw_scores, valid, penalty_reward, terms, weights)
    rewards, kl, non_score = megacoach_rewards(scores, logprobs, ref_logprobs, kl_coef, whiten_rewards, mask=mask)
    adv, returns = advantages_and_returns(rewards, values, gamma, lam, mask=mask)
    return RewardPath(scores, kl, non_score, rewards, adv, returns)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """How much of the returns' variance the value head explains, ORIG's ``ppo/val/var_explained``:
    ``1 - mean((values - returns)^2) / var(returns)`` (biased variance, real tokens only).

    Note: this uses the mean squared error, as ORIG, not baselines' ``var(returns - values)``; the
    two differ when the errors have a non-zero mean. 1 = perfect, 0 = no better than the mean,
    negative = worse. When ``var(returns)`` is 0 the quantity is undefined; 0 is returned (no NaN).

    Returns:
        A detached 0-d tensor.
    """
    _check_shape(returns, tuple(values.shape), "returns")
    m = _bool_mask(mask, values)
    with torch.no_grad():
        mse = masked_mean((values.detach() - returns.detach()) ** 2, m)
        var = masked_var(returns.detach(), m)
        ev = 1.0 - mse / torch.where(var > 0, var, torch.ones_like(var))
        return torch.where(var > 0, ev, torch.zeros_like(ev))  # no host sync, no NaN


def iteration_metrics(batch, stats: dict[str, float], kl_coef: float, lr: float, iteration: int,
                      episodes: int) -> dict[str, float]:
    """The metrics of one PPO iteration, named as in the reference code and cleanrl: `objective/*` for the
    Megacoach reward (`kl_coef` is the beta the batch was optimised with), `ppo/*` for the update."""
    path = batch.path
    non_score = float(path.non_score.sum(1).mean())
    mask = batch.mask
    returns_mean, returns_var = ((path.returns.mean(), path.returns.var(unbiased=False)) if mask is None else
                                 (masked_mean(path.returns, mask), masked_var(path.returns, mask)))
    out = {
        "iteration": iteration,
        "episodes": episodes,
        "objective/score": float(path.scores.mean()),
        "objective/score_raw_valid": float(batch.raw_scores[batch.valid].mean()) if batch.valid.any() else 0.0,
        "objective/valid_frac": float(batch.valid.float().mean()),
        "objective/kl": float(mean_sequence_kl(path.kl)),
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
        "ppo/val/var_explained": float(explained_variance(batch.values, path.returns, mask)),
        "ppo/returns/mean": float(returns_mean),
        "ppo/returns/var": float(returns_var),
        "ppo/lr": float(lr),
    }
    if mask is not None:  # responses that end at stops: how long they were
        out["objective/response_tokens"] = float(mask.float().sum(1).mean())
    return out
