"""Optimiser pieces for the Apprentice: a TensorFlow-style Adam and the linear learning-rate decay.

Why a TF-style Adam: ORIG trained with TF1's ``tf.train.AdamOptimizer``; DET found that PyTorch's
``torch.optim.Adam`` with the same hyper-parameters gives about 6x the approximate KL early in PPO.
The two differ only in where epsilon sits relative to the bias correction (t = step, from 1)::

    TF style (this module):  lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)
                             p   -= lr_t * m / (sqrt(v) + eps)
    torch.optim.Adam:        p   -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
                                  = lr_t * m / (sqrt(v) + eps * sqrt(1 - b2^t))

so torch's Adam behaves like TF's with an effective epsilon ``eps * sqrt(1 - b2^t)``, which is
about 32x smaller at t = 1 (b2 = 0.999). When gradients are tiny compared with eps (|g| ~ eps),
TF's first steps are therefore much smaller; for |g| >> eps the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Callable

import torch

from megacoach.errors import ConfigError

__all__ = ["AdamTFStyle", "linear_decay"]


class AdamTFStyle(torch.optim.Optimizer):
    """Adam as TF1 computes it (see the module docstring). No weight decay, no amsgrad.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (> 0; schedules such as ``LambdaLR`` change ``param_groups[i]['lr']``).
        betas: (b1, b2), each in [0, 1).
        eps: 1e-5 by default, as ORIG's Adam (TF's own default is 1e-8).
        foreach: update all parameters of a group with torch's multi-tensor (``torch._foreach_*``) ops, a few
            calls per step instead of a few per parameter; the same arithmetic.

    State per parameter: ``step`` (int), ``exp_avg`` (m), ``exp_avg_sq`` (v); ``state_dict()`` /
    ``load_state_dict()`` come from ``torch.optim.Optimizer``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-5,
        foreach: bool = False,
    ) -> None:
        if not lr > 0:
            raise ConfigError(f"lr: expected > 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"betas: expected two numbers in [0, 1), got {betas}")
        if not eps >= 0:
            raise ConfigError(f"eps: expected >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "foreach": foreach})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("foreach"):
                self._foreach_step(group)
                continue
            lr = group["lr"]
            b1, b2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self._advance(p)
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                lr_t = _tf_lr(lr, b1, b2, t)
                denom = v.sqrt().add_(eps)  # eps NOT scaled by the bias correction
                p.addcdiv_(m, denom, value=-lr_t)
        return loss

    def _advance(self, p: torch.Tensor) -> dict:
        """`p`'s state (created at its first step: m and v zero) with its step count advanced by one."""
        if p.grad.is_sparse:
            raise RuntimeError("AdamTFStyle does not support sparse gradients")
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = int(state["step"]) + 1
        return state

    def _foreach_step(self, group: dict) -> None:
        """The same update for every parameter of `group` that has a gradient, in multi-tensor calls (parameters
        are bucketed by their step count, which differs only for one that missed a gradient)."""
        b1, b2 = group["betas"]
        buckets: dict[int, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            buckets.setdefault(self._advance(p)["step"], []).append(p)
        for t, params in buckets.items():
            grads = [p.grad for p in params]
            ms = [self.state[p]["exp_avg"] for p in params]
            vs = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, grads, alpha=1.0 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
            lr_t = _tf_lr(group["lr"], b1, b2, t)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, group["eps"])  # eps NOT scaled by the bias correction
            torch._foreach_addcdiv_(params, ms, denom, value=-lr_t)


def _tf_lr(lr: float, b1: float, b2: float, t: int) -> float:
    """TF1's bias-corrected step size at step t (from 1): lr * sqrt(1 - b2^t) / (1 - b1^t)."""
    return lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)


def linear_decay(step: int, total_steps: int) -> float:
    """Learning-rate multiplier decaying linearly from 1 (step 0) to 0 (step ``total_steps``), then 0.

    ORIG/DET: ``lr_now = lr * (1 - (update - 1) / n_updates)`` with updates counted from 1, i.e.
    ``linear_decay(update - 1, n_updates)``. Use with ``torch.optim.lr_scheduler.LambdaLR``:
    ``LambdaLR(opt, functools.partial(linear_decay, total_steps=n_updates))``.

    Raises:
        ConfigError: ``total_steps`` <= 0.
    """
    if total_steps <= 0:
        raise ConfigError(f"total_steps: expected > 0, got {total_steps}")
    return min(1.0, max(0.0, 1.0 - step / total_steps))
