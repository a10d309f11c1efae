"""The sampler and the trainer must compute the same policy: PPO's first ratio of every update is 1 by construction,
so the trainer's log-probs of the rollout's tokens must equal the rollout's own up to float rounding
(ppo/consistency.py has the figures and the tolerances).

    check_sampler_trainer(trainer, queries, scale)   preflight: one update on a scratch copy, stopped before its step
    halt_on_disagreement(figures, trainer, scale)    every update, before its first optimiser step (GuardHalt)
"""

from __future__ import annotations

import torch

from megacoach.guards import probe as P
from megacoach.guards.alarms import Alarm, GuardHalt
from megacoach.lm.hf import PRECISION_ATTR
from megacoach.ppo import consistency

COMPONENT = "sampler and trainer (ResponseGenerator's log-probs against PPOTrainer.update's forward)"


class _BeforeStep(Exception):
    """Raised by the preflight's hook to leave the update before its first optimiser step."""


def tolerance(trainer, scale: float = 1.0) -> dict[str, float]:
    """What float rounding allows at the Apprentice's precision (and TF32 matmuls on a GPU that uses them)."""
    tf32 = trainer.device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)
    return consistency.tolerances(consistency.compute_type(getattr(trainer.apprentice.lm, PRECISION_ATTR, None), tf32),
                                  scale)


def _describe(figs: dict, tol: dict) -> str:
    return (f"approxkl {figs['approxkl']:.3g} (tolerance {tol['approxkl']:.3g}), largest per-token log-ratio "
            f"{figs['max_logratio']:.3g} (tolerance {tol['max_logratio']:.3g}) over {int(figs['tokens'])} tokens")


def check_sampler_trainer(trainer, queries, one_step_config, scale: float = 1.0):
    """A rollout of `queries` and PPO's update on it (cut by `one_step_config` to one minibatch of all of them), on
    a scratch copy, stopped before its optimiser step: (passed, message, figures)."""
    got: dict = {}

    def capture(figs: dict) -> None:
        got.update(figs)
        raise _BeforeStep

    with P.scratch(trainer):
        batch = trainer.rollout(queries)
        trainer.cfg = one_step_config(trainer.cfg, len(queries), trainer.dist.world_size)
        trainer.before_first_step = capture
        try:
            trainer.update(batch)
        except _BeforeStep:
            pass
    tol = tolerance(trainer, scale)
    figs = {**got, "tolerance_approxkl": tol["approxkl"], "tolerance_max_logratio": tol["max_logratio"]}
    if not got:
        return False, "PPOTrainer.update reached no optimiser step on a probe batch", figs
    why = consistency.disagreement(got, tol)
    if not why:
        return True, (f"the trainer's log-probs of {len(queries)} sampled responses equal the sampler's within float "
                      f"rounding: {_describe(got, tol)}"), figs
    return False, (f"the trainer's log-probs of the rollout's tokens differ from the sampler's beyond float rounding "
                   f"({_describe(got, tol)}): {'; '.join(why)}. PPO's ratios, clipping and KL would all be off by "
                   "this"), figs


def halt_on_disagreement(figs: dict, trainer, scale: float = 1.0) -> None:
    """GuardHalt (before the update's first optimiser step) when the figures are beyond float rounding."""
    tol = tolerance(trainer, scale)
    why = consistency.disagreement(figs, tol)
    if why:
        raise GuardHalt(Alarm("rollout_agreement", "halt", f"before the first optimiser step of iteration "
                              f"{trainer.iteration_no + 1}: the trainer's log-probs of the rollout's tokens differ "
                              f"from the sampler's ({_describe(figs, tol)}): {'; '.join(why)}",
                              {**figs, "tolerance_approxkl": tol["approxkl"],
                               "tolerance_max_logratio": tol["max_logratio"]}))
