"""Do the sampler and the trainer compute the same policy? (pure maths on the log-probs of one minibatch)

PPO's first ratio of every update is exactly 1 by construction: before the first optimiser step the trainer's
weights are the ones the rollout sampled with, so the trainer's log-probability of every sampled token must equal
the rollout's own, up to float rounding. A gap beyond rounding means the two compute different distributions (a
temperature applied in one place only, a token left out of one softmax, a mask that differs, another precision or
engine), and every ratio, clip and KL of the update is off by it. `rollout_agreement` measures the gap on the first
minibatch of an update (`PPOTrainer.update`); `tolerances` are what float rounding allows at the Apprentice's
precision.

Measured on the built-in model (float32, CPU; the sampler's KV-cached pass against the update's full forward, 32
responses of 24 tokens at temperature 0.7): largest per-token log-ratio 1.25e-5 (about 100 float32 epsilons),
approxkl 6.0e-12; the same tokens with the update's log-probs at temperature 1: largest 3.3 nats, approxkl 0.20.
"""

from __future__ import annotations

import torch

# float32 epsilon, and the other compute types' (bf16 autocast, fp16 weights, TF32 matmuls)
EPS = {"fp32": 2.0 ** -23, "tf32": 2.0 ** -10, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10}
MAX_FACTOR = 4096  # largest per-token |log-ratio| allowed, in epsilons (float32: 4.9e-4, 39x the built-in's)
RMS_FACTOR = 256  # root-mean-square log-ratio allowed, in epsilons (float32: 3.1e-5, approxkl 4.7e-10, 78x)
MAX_CEILING, RMS_CEILING = 1.0, 0.1  # low precisions: no tolerance above these (a temperature slip is ~0.6 rms)


def compute_type(precision: str | None, tf32: bool = False) -> str:
    """The type the Apprentice's log-probs are rounded in: its precision (megacoach/hardware.py) and TF32 matmuls."""
    if precision in ("bf16-mixed", "bf16"):
        return "bf16"
    if precision == "fp16":
        return "fp16"
    return "tf32" if tf32 else "fp32"


def tolerances(kind: str, scale: float = 1.0) -> dict[str, float]:
    """{'approxkl', 'max_logratio'}: what float rounding allows between two passes of one model in `kind`
    (`compute_type`), times `scale` (guards.rollout_tolerance)."""
    eps = EPS[kind]
    rms = min(RMS_FACTOR * eps, RMS_CEILING) * scale
    return {"approxkl": 0.5 * rms * rms, "max_logratio": min(MAX_FACTOR * eps, MAX_CEILING) * scale}


def rollout_agreement(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                      mask: torch.Tensor | None = None) -> dict[str, float]:
    """Figures of the trainer's log-probs `new_logprobs` [B, T] against the rollout's `old_logprobs` [B, T] on the
    real tokens (`mask`; None: all): approxkl (mean of half the squared log-ratio), the largest |log-ratio|, its
    mean (a constant shift: one softmax has a term the other lacks), the slope of the trainer's log-probs on the
    rollout's (least squares with an intercept: 1 = same temperature, about T_rollout / T_trainer when
    the temperature differs) and the share of the difference on each response's last real token."""
    new = new_logprobs.detach().double()
    old = old_logprobs.detach().double()
    m = torch.ones_like(new, dtype=torch.bool) if mask is None else mask.to(device=new.device, dtype=torch.bool)
    d = torch.where(m, new - old, torch.zeros((), dtype=new.dtype, device=new.device))
    n = int(m.sum())
    if n == 0:
        return {"approxkl": 0.0, "max_logratio": 0.0, "mean_logratio": 0.0, "slope": 1.0, "last_token_share": 0.0,
                "tokens": 0}
    o, nw = old[m], new[m]
    oc = o - o.mean()
    denom = float((oc * oc).sum())
    slope = float((oc * (nw - nw.mean())).sum()) / denom if denom > 0 else 1.0  # least squares, with an intercept
    last = m.long().cumsum(1).eq(m.long().sum(1, keepdim=True)) & m  # each row's last real token
    total = float(d.abs().sum())
    return {"approxkl": float(0.5 * (d * d).sum()) / n, "max_logratio": float(d.abs().max()),
            "mean_logratio": float(d.sum()) / n, "slope": slope,
            "last_token_share": float(d.abs()[last].sum()) / total if total > 0 else 0.0, "tokens": n}


def disagreement(figures: dict[str, float], tol: dict[str, float]) -> list[str]:
    """What the figures say differs between the sampler and the trainer, beyond `tol` (empty: nothing)."""
    if figures["approxkl"] <= tol["approxkl"] and figures["max_logratio"] <= tol["max_logratio"]:
        return []
    why = []
    if abs(figures["slope"] - 1.0) > 0.02:
        why.append(f"temperature: the trainer's log-probs are the rollout's times {figures['slope']:.3f} (a "
                   "temperature applied in one of them only)")
    rms = (2 * figures["approxkl"]) ** 0.5
    if abs(figures["mean_logratio"]) > 0.9 * rms and not why:
        why.append(f"a constant shift of {figures['mean_logratio']:+.3g} nats per token: one softmax has a term the "
                   "other lacks (a token left out of one of them, such as the pad token)")
    if figures["last_token_share"] > 0.5 and not why:
        why.append(f"masks: {figures['last_token_share']:.0%} of the difference sits on each response's last real "
                   "token (where the response ends differs)")
    if not why:
        why.append("precision or engine: the sampler's forward and the trainer's disagree beyond float rounding")
    return why
