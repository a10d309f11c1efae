"""The pure maths of PPO for the Apprentice: small functions on tensors, no models, no side effects.

Sign convention (one, used by every function here and everywhere in megacoach)
------------------------------------------------------------------------------
* Rewards are what PPO MAXIMISES. A larger reward means "do more of this".
* ``score`` is the Values Coach output after normalisation (higher = more preferred by people), or
  the fixed invalid-response penalty (e.g. -1) when the response lacks its stop token.
* ``kl_t = logp_policy_t - logp_ref_t`` per response token (the k1 estimator, as ORIG); it is >= 0
  in expectation under the policy. This is what the Coherence Coach penalises.
* The Megacoach reward per token is ``r_t = -kl_coef * kl_t``, and ``score`` is ADDED on the last
  real response token: ``R = score - kl_coef * sum_t kl_t`` per episode.
* Advantages are "how much better than expected": positive advantage -> make that token MORE likely.
* The policy loss that is MINIMISED is ``-min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)``, averaged
  over real tokens. The value loss is ``0.5 * mean(max((v-R)^2, (clip(v, v_old +- eps) - R)^2))``.

A sign slip anywhere along that chain is the section 4.4 incident of the paper; tests in
tests/test_ppo_maths.py pin every link of it.

Shapes and masks
----------------
``B`` = batch (episodes), ``T`` = response tokens, ``V`` = vocabulary. ``mask`` is ``[B, T]``
(bool, int or float), 1 for real response tokens and 0 for padding after truncation; it is always
optional, and ``None`` means every token is real (ORIG trains on all sampled tokens). Functions that
reduce ignore masked entries; functions that return ``[B, T]`` tensors return 0 at masked entries.
Masked entries may hold anything (even inf or NaN): they are selected away with ``torch.where``,
never multiplied by 0, so they never leak NaN into results or gradients.
On the paper's task the trainer passes no mask: its responses are exactly ``response_length`` sampled tokens, all
of them trained on. With stops (``task.stop``, ``task.stop_at_eos``) responses end early and the positions after
the stop are padding, not sampled: the trainer passes each episode's mask (ppo/episodes.py ``response_mask``);
tests/test_ppo_maths.py pins the masks, tests/test_instruct.py the trainer's use of them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megacoach.errors import DataError

WHITEN_EPS = 1e-8  # as ORIG's whiten: (x - mean) * rsqrt(var + 1e-8)

__all__ = [
    "WHITEN_EPS",
    "assemble_rewards",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_per_token",
    "last_true_index",
    "linear_logprobs",
    "linear_logprobs_and_entropy",
    "logprobs_from_logits",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_var",
    "mean_sequence_kl",
    "policy_loss",
    "sequence_kl",
    "value_loss",
    "whiten",
    "whiten_rewards",
]


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- log-probs, entropy, KL


def _check_tokens(logits: torch.Tensor, tokens: torch.Tensor) -> None:
    if logits.shape[:-1] != tokens.shape:
        raise DataError(f"tokens: expected shape {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise DataError(f"temperature: expected > 0, got {temperature}")


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) over the last axis, in float32 at least (bf16/fp16 logits are upcast)."""
    _check_temperature(temperature)
    lg = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        lg = lg / temperature
    return F.log_softmax(lg, dim=-1)


def _chosen(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(logp, -1, tokens.long().unsqueeze(-1)).squeeze(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    # 0 * log 0 = 0. Zero logp where p underflows BEFORE multiplying, so that neither the value nor
    # the gradient sees 0 * (-inf) (a where() after the product would still backpropagate NaN).
    safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -(p * safe_logp).sum(dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each chosen token: ``log_softmax(logits / temperature)[..., token]``.

    Numerically stable (log_softmax, never log(softmax)); computed in float32 at least, so bf16/fp16
    logits do not lose precision. Logits of +-1e4 or -inf (forbidden tokens) are fine.

    Args:
        logits: ``[B, T, V]``, already aligned with ``tokens`` (logits at position t predict
            ``tokens[:, t]``; the caller does the usual shift by one).
        tokens: ``[B, T]`` integer token ids.
        temperature: the sampling temperature; the policy's log-probs must use the same temperature
            the responses were sampled with (0.7 for the style tasks), or the ratio is off.

    Returns:
        ``[B, T]`` log-probs (<= 0), float32 (or float64 for float64 logits).
    """
    _check_tokens(logits, tokens)
    return _chosen(_log_softmax(logits, temperature), tokens)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution at each position: ``-sum_v p_v log p_v``.

    Stable for huge logits and for -inf logits (0 * log 0 is taken as 0).

    Args:
        logits: ``[..., V]``; temperature as in :func:`logprobs_from_logits`.

    Returns:
        ``[...]`` entropies (>= 0).
    """
    return _entropy(_log_softmax(logits, temperature))


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the chosen tokens [B, T], entropies [B, T]) from ONE log-softmax of ``logits`` [B, T, V].

    The same numbers as :func:`logprobs_from_logits` and :func:`entropy_from_logits` (the same operations in the
    same order), in one pass over the vocabulary instead of two: the PPO update needs both at every response
    position. Gradients flow into the log-probs only; the entropy is a statistic (computed without gradient).
    """
    _check_tokens(logits, tokens)
    logp = _log_softmax(logits, temperature)
    chosen = _chosen(logp, tokens)
    with torch.no_grad():
        entropy = _entropy(logp.detach())
    return chosen, entropy


# --------------------------------------------------------------------------- the fused response head
# The response head in one pass with its own gradient (ppo.fused_head).
#
# From the hidden states h [N, d] that predict the response tokens and a linear LM head (weight W [V, d], bias b):
#
#     z       = scale * (h W^T + b)          scale = the family's logit factor / the temperature
#     logp    = z - logsumexp(z)             (one log-softmax over the vocabulary)
#     chosen  = logp[token]                  the sampled tokens' log-probs (what PPO's ratio reads)
#     entropy = -sum_v softmax(z)_v logp_v   a statistic: no gradient
#     d chosen / d z = onehot(token) - softmax(z)
#
# Autograd through those ops keeps the [N, V] logits and log-probs for its backward pass, and makes several more
# [N, V] tensors in it. `linear_logprobs_and_entropy` computes z in chunks of rows (the whole [N, V] logits never
# exist at once), keeps only softmax(z) for the backward pass, and turns it into the logits' gradient in place: one
# [N, V] tensor in all, and two matmuls each way. The same numbers as `logprobs_and_entropy` over
# `lm.hf.lm_logits`, up to float rounding (tests/test_speed_levers.py); no compiler is needed. `linear_logprobs` is
# the same forward without gradient or entropy: the original model's log-probs for the Coherence Coach.

HEAD_CHUNK_ROWS = 128  # rows of z per chunk: 128 x 8192 float32 = 4 MiB (measured: 128 to 256 rows are best)


def _chunked_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                      scale: float, chunk: int, probs: torch.Tensor | None = None,
                      entropy: torch.Tensor | None = None) -> torch.Tensor:
    """chosen [N] from h [N, d]; fills `probs` [N, V] with softmax(z) and `entropy` [N] where they are given. z is
    made `chunk` rows at a time in one reused buffer."""
    n, v = h.shape[0], weight.shape[0]
    chosen = torch.empty(n, dtype=torch.float32, device=h.device)
    buf = torch.empty(min(chunk, n), v, dtype=torch.float32, device=h.device)
    spare = torch.empty_like(buf) if probs is None and entropy is not None else None
    wt = weight.t()
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = buf[: e - s]
        hs = h[s:e] if scale == 1.0 else h[s:e] * scale  # the scale on the narrow side: [rows, d], not [rows, V]
        if bias is None:
            torch.mm(hs, wt, out=z)
        else:
            torch.addmm(bias, hs, wt, beta=scale, out=z)
        z.sub_(z.amax(dim=-1, keepdim=True))  # z - max(z): exp cannot overflow
        picked = z.gather(1, tokens[s:e, None]).squeeze(1)
        # exp(z): into the kept softmax, a spare buffer (for the entropy), or z itself (nothing else reads it)
        out = probs[s:e] if probs is not None else None if spare is None else spare[: e - s]
        p = z.exp_() if out is None else torch.exp(z, out=out)
        total = p.sum(dim=-1)
        log_total = total.log()
        chosen[s:e] = picked - log_total
        if entropy is not None:  # -sum softmax * logp = log(total) - sum(exp(z) * z) / total
            entropy[s:e] = log_total - torch.linalg.vecdot(p, z) / total
        if probs is not None:
            p.div_(total[:, None])  # softmax(z), for the backward pass
    return chosen


class _LinearLogprobs(torch.autograd.Function):
    """(chosen [N], entropy [N]) from h [N, d], W [V, d], b [V] or None, tokens [N]; see the module's docstring."""

    @staticmethod
    def forward(ctx, h, weight, bias, tokens, scale: float, chunk: int, keep: bool):
        # keep: a backward pass will come, and it needs softmax(z)
        probs = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device) if keep else None
        entropy = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        chosen = _chunked_logprobs(h, weight, bias, tokens, scale, chunk, probs, entropy)
        ctx.mark_non_differentiable(entropy)
        ctx.scale = scale
        ctx.save_for_backward(h, weight, bias, tokens, probs)
        return chosen, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_chosen, _grad_entropy):
        if getattr(ctx, "spent", False):  # said here too: saved-tensor hooks would skip autograd's version check
            raise RuntimeError("the fused head's backward pass ran twice over one graph (retain_graph=True): its "
                               "saved softmax was modified by an inplace operation, into the first gradient")
        ctx.spent = True
        h, weight, bias, tokens, probs = ctx.saved_tensors
        g = grad_chosen.float() * ctx.scale
        grad_z = probs.mul_(-g[:, None])  # in place: softmax(z) is not read again (a second backward fails loudly)
        grad_z[torch.arange(grad_z.shape[0], device=grad_z.device), tokens] += g
        grad_h = grad_z @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad_z.t() @ h if ctx.needs_input_grad[1] else None
        grad_b = grad_z.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _flat(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
          temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """(hidden as [N, d], tokens as [N], the leading shape) after the checks of the inputs."""
    _check_temperature(temperature)
    if hidden.shape[:-1] != tokens.shape:
        raise DataError(f"tokens: expected shape {tuple(hidden.shape[:-1])}, got {tuple(tokens.shape)}")
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"the fused head runs in float32 (hidden {hidden.dtype}, weight {weight.dtype})")
    return hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1).long(), hidden.shape[:-1]


def linear_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                tokens: torch.Tensor, temperature: float = 1.0, scale: float = 1.0,
                                chunk_rows: int = HEAD_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of `tokens` [...], entropies [...] without gradient) of softmax(scale * (hidden W^T + b) /
    temperature), for float32 `hidden` [..., d], `weight` [V, d] and `bias` [V] (or None); `scale` is the family's
    own logit factor (`lm.hf.linear_head`). Gradients flow into hidden, weight and bias through the log-probs."""
    h, tok, lead = _flat(hidden, weight, tokens, temperature)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    chosen, entropy = _LinearLogprobs.apply(h.contiguous(), weight, bias, tok, float(scale / temperature),
                                            int(chunk_rows), keep)
    return chosen.reshape(lead), entropy.reshape(lead)


@torch.no_grad()
def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                    temperature: float = 1.0, scale: float = 1.0, chunk_rows: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """The log-probs of `tokens` [...] alone, without gradient (the original model's, for the Coherence Coach): the
    same chunks, no softmax kept and no entropy."""
    h, tok, lead = _flat(hidden, weight, tokens, temperature)
    return _chunked_logprobs(h.contiguous(), weight, bias, tok, float(scale / temperature),
                             int(chunk_rows)).reshape(lead)


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


# --------------------------------------------------------------------------- rewards


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
    """ORIG's reward scaling (``ppo.whiten_rewards=True``): rewards whitened per minibatch with the
    mean kept, i.e. ``whiten(rewards, mask, shift_mean=False)``.

    Applied to each PPO minibatch's ``[B, T]`` per-token rewards right before GAE. ORIG requires a
    minibatch of at least 8 episodes for this to be meaningful. It does not change the sign of
    anything: the mean reward is unchanged, deviations from it are rescaled by a positive factor.
    """
    return whiten(rewards, mask, shift_mean=False)


# --------------------------------------------------------------------------- advantages


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


# --------------------------------------------------------------------------- losses


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
