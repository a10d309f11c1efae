"""What the guards say: alarms (warn / pause / halt), and the two errors that stop training.

- `GuardFailure`: a preflight check failed. Training is refused before anything is optimised; the
  message names the component of the reward path that points the wrong way. The CLI prints it and
  exits with code 2 (it is a `MegacoachError`).
- `GuardHalt`: a live check inside an iteration (before PPO's update) found the batch about to be
  optimised pointing the wrong way. The loop catches it and halts the run exactly like an alarm
  from `after_iteration` (checkpoint, HALTED.json, report, exit code 3), with nothing of that batch
  optimised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megacoach.errors import MegacoachError

ACTIONS = ("warn", "pause", "halt")


def _clean(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


@dataclass
class Alarm:
    """One guard's verdict. name: the monitor (e.g. 'labeler_drop'); action: warn | pause | halt;
    message: one plain sentence for people; figures: the numbers behind it; samples: offending text."""

    name: str
    action: str
    message: str
    figures: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"alarm action {self.action!r} (expected one of {ACTIONS})")

    def as_dict(self) -> dict:
        return _clean({"name": self.name, "action": self.action, "message": self.message,
                       "figures": self.figures, "samples": self.samples[:8]})


class GuardFailure(MegacoachError):
    """A preflight check failed: the reward path would push the Apprentice against the labels.
    `component` names the part of the reward path; `checks` holds every check's figures."""

    def __init__(self, component: str, message: str, checks: list[dict] | None = None):
        self.component = component
        self.checks = checks or []
        super().__init__(f"guard preflight failed — {component}: {message}. Nothing was trained.")


class GuardHalt(MegacoachError):
    """Raised from `Guards.before_update`: halt before this batch is optimised."""

    def __init__(self, alarm: Alarm, evidence: dict | None = None):
        self.alarm = alarm
        self.evidence = evidence or {}
        super().__init__(f"guard {alarm.name}: {alarm.message}")
