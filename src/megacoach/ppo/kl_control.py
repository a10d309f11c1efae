"""The Coherence Coach's weight beta (``kl_coef``): fixed, or adapted toward a target KL, as ORIG.

The Megacoach reward is ``score - beta * KL`` (see objective.py for the sign convention), so beta must
be >= 0: a negative beta turns the KL penalty into a bonus for leaving the original model (half of
the paper's section 4.4 incident). Both controllers refuse a negative beta.

Adaptive control (style tasks: beta0 0.15, target 6 nats, horizon 10,000 episodes)::

    err  = clip(KL / target - 1, -0.2, 0.2)
    beta = beta * (1 + err * n_steps / horizon)

where KL is the batch mean of the per-episode summed per-token log-ratio
(:func:`megacoach.ppo.objective.mean_sequence_kl`) and ``n_steps`` the number of episodes in the batch.
With ORIG's horizon, beta moves by at most 2% per 1,000 episodes.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from megacoach.config import KLConfig
from megacoach.errors import ConfigError, DataError

__all__ = ["AdaptiveKLController", "FixedKLController", "KLController", "make_kl_controller"]


class KLController(Protocol):
    """What the trainer needs from a KL controller."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _check_coef(value: float, field: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{field}: expected a finite number >= 0 (beta, the KL penalty weight), got {value}")
    return value


def _load_value(state: dict[str, Any], kind: str) -> float:
    if not isinstance(state, dict) or "value" not in state:
        raise DataError(f"KL controller state: expected a dict with 'value', got {state!r}")
    if state.get("kind", kind) != kind:
        raise DataError(f"KL controller state: saved by a '{state.get('kind')}' controller, loading into '{kind}'")
    value = float(state["value"])
    if not math.isfinite(value) or value < 0:
        raise DataError(f"KL controller state: 'value' must be a finite number >= 0, got {value}")
    return value


class FixedKLController:
    """beta stays at ``kl_coef`` (summaries: 0.01 / 0.03 in the paper)."""

    kind = "fixed"

    def __init__(self, kl_coef: float) -> None:
        self.value: float = _check_coef(kl_coef, "kl_coef")

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept so the trainer can call every controller the same way)."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = _load_value(state, self.kind)

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value:g})"


class AdaptiveKLController:
    """beta adapted so that the policy's KL from the reference drifts toward ``target`` nats.

    Args:
        init_kl_coef: beta at the start (0.15 in ORIG's style tasks), >= 0.
        target: the KL (nats per episode) aimed at, > 0 (6.0 in ORIG).
        horizon: in episodes, > 0 (10,000 in ORIG); larger = slower adaptation.

    Raises:
        ConfigError: naming ``init_kl_coef``, ``target`` or ``horizon`` when out of range.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float = 0.15, target: float = 6.0, horizon: float = 10000) -> None:
        self.value: float = _check_coef(init_kl_coef, "init_kl_coef")
        target = float(target)
        horizon = float(horizon)
        if not math.isfinite(target) or target <= 0:
            raise ConfigError(f"target: expected a KL target in nats > 0, got {target}")
        if not math.isfinite(horizon) or horizon <= 0:
            raise ConfigError(f"horizon: expected a number of episodes > 0, got {horizon}")
        self.init_kl_coef = self.value
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """One update after a PPO batch.

        Args:
            current_kl: batch mean of the summed per-token KL (a float or a 0-d tensor).
            n_steps: episodes in that batch (>= 0).

        Raises:
            DataError: ``current_kl`` is NaN/inf or ``n_steps`` is negative (beta would be poisoned).
        """
        kl = float(current_kl)
        if not math.isfinite(kl):
            raise DataError(f"current_kl: expected a finite KL, got {kl}")
        if n_steps < 0:
            raise DataError(f"n_steps: expected >= 0 episodes, got {n_steps}")
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """``value`` is the state; target/horizon are saved for the record only."""
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores beta. ``target`` and ``horizon`` stay as configured now (the config is their
        source of truth, so a resumed run may change them)."""
        self.value = _load_value(state, self.kind)

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value:g}, target={self.target:g}, horizon={self.horizon:g})"


def make_kl_controller(kl: KLConfig) -> FixedKLController | AdaptiveKLController:
    """The Coherence Coach's controller for the `kl` config section: adaptive (ORIG's, towards `kl.target` over
    `kl.horizon` episodes) when `kl.adaptive`, else fixed at `kl.init_kl_coef`."""
    if kl.adaptive:
        return AdaptiveKLController(kl.init_kl_coef, target=kl.target, horizon=kl.horizon)
    return FixedKLController(kl.init_kl_coef)
