"""Specification bugs, injected for demonstrations and tests: each is a context manager that patches ONE
link of the real reward path (or of the Values Coach's training) while it is active, the way a careless
refactor would. Production code knows nothing about them: there is no `if bug:` anywhere; the trainer
looks every link up at call time (`objective.x(...)`; inside ppo/objective.py each link finds the next in the
module's namespace when it runs), so a patch is seen by training and guards alike.

    with inject("incident"):
        pipeline.train(cfg)  # guards.enabled: the guards watch the run

R = score - β·KL is what PPO should maximise. The kinds:

| name                | what the "refactor" did                                      | PPO maximises          | outcome             |
|---------------------|--------------------------------------------------------------|------------------------|---------------------|
| incident            | flipped the reward's sign and, by the same mistake, the KL   | -score - β·KL          | fluent, as negative |
|                     | penalty's (paper section 4.4); the logged KL term looks fine |                        | as the labelers can |
|                     |                                                              |                        | judge               |
| reward-flip         | flipped the summed per-token reward (ORIG sums score and KL  | -score + β·KL          | gibberish           |
|                     | term into one tensor) — the reward alone                     |                        |                     |
| no-coherence-coach  | dropped the KL penalty (β = 0 in the reward)                 | score                  | coach-pleasing      |
|                     |                                                              |                        | gibberish           |
| score-sign          | subtracts the score where it is added on the last token      | -score - β·KL          | fluent, negative    |
| negated-gain        | the Values Coach's normalisation gain applied with the wrong | -score (+ bias)        | fluent, negative    |
|                     | sign                                                         |                        |                     |
| inverted-labels     | the Values Coach trained on the label direction inverted     | what labelers liked    | fluent, negative    |
|                     | (its loss prefers every sample but the chosen one)           | least (per the coach)  |                     |
| kl-sign             | the KL penalty's sign alone (β·KL becomes a bonus)           | score + β·KL           | drifts to gibberish |
| advantage-sign      | GAE's advantages negated                                     | -(score - β·KL)        | gibberish           |
| loss-sign           | the clipped policy loss maximised instead of minimised       | -(score - β·KL)        | gibberish           |
| optimizer-ascent    | the optimiser steps up the loss's gradient                   | -(score - β·KL)        | gibberish           |
| reward-scaling-sign | the reward whitening (scale only) returns minus the rewards  | -(score - β·KL)        | gibberish           |
| choice-reversed     | the label store reads each choice from the other end of the  | what labelers liked    | fluent, negative    |
|                     | samples (K = 2: the other one): training, preflight, monitors| least                  |                     |
| temperature-one-    | the update's forward at temperature 1, the sampler at T      | ratios off from the    | off-policy drift    |
| place               | (TRL's server mode, trl#4159; prime-rl PR#697)               | first step             |                     |
| pad-leak            | GAE over the padding after each response (ROLL PR#447)      | + padding's values     | advantages moved    |
| kl-zeroed           | the KL measured against the Apprentice itself: always 0      | score                  | coach-pleasing drift|
| term-sign           | a reward term's weight with the wrong sign (reward.terms)    | score - term           | the term's opposite |

`affects_values_coach` marks the kinds that act while the Values Coach is TRAINED (the others act on PPO);
the incident command and the benchmark train a separate Values Coach under those.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from megacoach.ppo import objective, policy
from megacoach.ppo import trainer as trainer_mod
from megacoach.errors import ConfigError
from megacoach.labels.store import LabelStore
from megacoach.reward import train as reward_train
from megacoach.reward.model import RewardModel


@dataclass(frozen=True)
class Bug:
    name: str
    summary: str
    maximises: str
    outcome: str
    patch: Callable[[ExitStack], None]
    affects_values_coach: bool = False
    overrides: dict | None = None  # config the bug needs to act (a reward term to flip); the incident adds it


def _setattr(stack: ExitStack, obj, name: str, value) -> None:
    old = getattr(obj, name)
    setattr(obj, name, value)
    stack.callback(setattr, obj, name, old)


# ------------------------------------------------------------------------------------------ patches
def _incident(stack: ExitStack) -> None:
    orig = objective.megacoach_rewards

    def megacoach_rewards(scores, logprobs, ref_logprobs, kl_coef, whiten, mask=None):
        # "-(score + β·KL)": the reward negated, and the KL penalty's sign flipped by the same slip, so the
        # logged non-score reward still reads -β·KL
        rewards, kl, non_score = orig(scores, logprobs, ref_logprobs, -kl_coef, whiten, mask)
        return -rewards, kl, -non_score

    _setattr(stack, objective, "megacoach_rewards", megacoach_rewards)


def _reward_flip(stack: ExitStack) -> None:
    orig = objective.megacoach_rewards

    def megacoach_rewards(scores, logprobs, ref_logprobs, kl_coef, whiten, mask=None):
        rewards, kl, non_score = orig(scores, logprobs, ref_logprobs, kl_coef, whiten, mask)
        return -rewards, kl, non_score  # the summed tensor flipped; the logged KL term unchanged

    _setattr(stack, objective, "megacoach_rewards", megacoach_rewards)


def _no_coherence_coach(stack: ExitStack) -> None:
    orig = objective.megacoach_rewards

    def megacoach_rewards(scores, logprobs, ref_logprobs, kl_coef, whiten, mask=None):
        rewards, kl, _ = orig(scores, logprobs, ref_logprobs, 0.0, whiten, mask)
        _, _, non_score = orig(scores, logprobs, ref_logprobs, kl_coef, whiten, mask)
        return rewards, kl, non_score  # the logged KL term still shows -β·KL

    _setattr(stack, objective, "megacoach_rewards", megacoach_rewards)


def _score_sign(stack: ExitStack) -> None:
    orig = objective.assemble_rewards

    def assemble_rewards(score, kl, kl_coef, mask=None):
        return orig(-score, kl, kl_coef, mask)

    _setattr(stack, objective, "assemble_rewards", assemble_rewards)


def _negated_gain(stack: ExitStack) -> None:
    def forward(self, input_ids, pad_id=None):
        return -self.gain * self.raw(input_ids, pad_id) + self.bias

    _setattr(stack, RewardModel, "forward", forward)


def _inverted_labels(stack: ExitStack) -> None:
    orig = reward_train.best_of_k_loss

    def best_of_k_loss(rewards, chosen):
        return orig(-rewards, chosen)  # the coach learns to rank the labelers' choice LAST

    _setattr(stack, reward_train, "best_of_k_loss", best_of_k_loss)


def _kl_sign(stack: ExitStack) -> None:
    orig = objective.megacoach_rewards

    def megacoach_rewards(scores, logprobs, ref_logprobs, kl_coef, whiten, mask=None):
        rewards, kl, _ = orig(scores, logprobs, ref_logprobs, -kl_coef, whiten, mask)
        _, _, non_score = orig(scores, logprobs, ref_logprobs, kl_coef, whiten, mask)
        return rewards, kl, non_score

    _setattr(stack, objective, "megacoach_rewards", megacoach_rewards)


def _advantage_sign(stack: ExitStack) -> None:
    orig = objective.advantages_and_returns

    def advantages_and_returns(rewards, values, gamma, lam, mask=None):
        adv, returns = orig(rewards, values, gamma, lam, mask)
        return -adv, returns

    _setattr(stack, objective, "advantages_and_returns", advantages_and_returns)


def _loss_sign(stack: ExitStack) -> None:
    orig = objective.policy_loss

    def policy_loss(new_logp, old_logp, advantages, clip=0.2, mask=None):
        loss, stats = orig(new_logp, old_logp, advantages, clip, mask)
        return -loss, stats

    _setattr(stack, objective, "policy_loss", policy_loss)


def _optimizer_ascent(stack: ExitStack) -> None:
    cls = trainer_mod.PPOTrainer
    orig_init = cls.__init__

    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        opt = self.optimizer
        base = type(opt)

        class Ascending(base):  # steps UP the gradient: every gradient negated before the step
            def step(self, closure=None):
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            if p.grad is not None:
                                p.grad.neg_()
                return base.step(self, closure)

        Ascending.__name__ = base.__name__
        opt.__class__ = Ascending
        self.optimizer.__dict__.pop("step", None)  # the scheduler's wrapper bound the old method
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, self.scheduler.lr_lambdas[0])

    _setattr(stack, cls, "__init__", __init__)


def _reward_scaling_sign(stack: ExitStack) -> None:
    orig = objective.whiten_rewards

    def whiten_rewards(rewards, mask=None):
        return -orig(rewards, mask)

    _setattr(stack, objective, "whiten_rewards", whiten_rewards)


def _choice_reversed(stack: ExitStack) -> None:
    orig = LabelStore._comparison_records

    def _comparison_records(self, s, rows):
        # the label's choice read from the other end of the canonical order (K = 2: the other sample)
        return [replace(c, chosen=c.k - 1 - c.chosen) for c in orig(self, s, rows)]

    _setattr(stack, LabelStore, "_comparison_records", _comparison_records)


def _temperature_one_place(stack: ExitStack) -> None:
    orig = policy.Apprentice.forward

    def forward(self, input_ids, pad_id, response_length, temperature, with_values=True, responses=None):
        # the update's forward (the only one with gradients) lost the temperature; the sampler still applies it
        return orig(self, input_ids, pad_id, response_length, 1.0 if torch.is_grad_enabled() else temperature,
                    with_values, responses)

    _setattr(stack, policy.Apprentice, "forward", forward)


def _pad_leak(stack: ExitStack) -> None:
    def advantages_and_returns(rewards, values, gamma, lam, mask=None):
        # GAE run over the padding as if every position were real (the value at the first pad bootstraps the last
        # real token), then whitened over the real tokens
        adv, returns = objective.gae(rewards, values, gamma, lam, None)
        return objective.whiten(adv, mask), returns

    _setattr(stack, objective, "advantages_and_returns", advantages_and_returns)


def _kl_zeroed(stack: ExitStack) -> None:
    orig = objective.megacoach_rewards

    def megacoach_rewards(scores, logprobs, ref_logprobs, kl_coef, whiten, mask=None):
        # the Apprentice passed where the original model belongs: the KL term is 0 and constrains nothing
        return orig(scores, logprobs, logprobs, kl_coef, whiten, mask)

    _setattr(stack, objective, "megacoach_rewards", megacoach_rewards)


def _term_sign(stack: ExitStack) -> None:
    orig = objective.term_total

    def term_total(values, weights):
        flipped = weights.clone()
        flipped[..., 0] = -flipped[..., 0]  # the first term's sign: a penalty added as a bonus
        return orig(values, flipped)

    _setattr(stack, objective, "term_total", term_total)


# a format rule for the term-sign bug to flip (the built-in model's Shakespeare: fewer exclamations)
EXCLAIM_TERM = {"reward": {"terms": [{"name": "no-exclaiming", "scorer": "regex:!", "weight": -0.5, "examples": [
    {"query": "What say you?", "better": "I pray you, stay.", "worse": "Out, out!"},
    {"query": "Who comes here?", "better": "My lord, the king.", "worse": "The king! The king!"},
    {"query": "Speak.", "better": "I will, my lord.", "worse": "Away!"}]}]}}


BUGS: dict[str, Bug] = {b.name: b for b in [
    Bug("incident", "the reward's sign and, by the same slip, the KL penalty's sign flipped (paper section 4.4)",
        "-score - β·KL", "fluent text, as negative as the labelers can judge", _incident),
    Bug("reward-flip", "the summed per-token reward negated (the reward alone)", "-score + β·KL",
        "gibberish: leaving the original model is rewarded", _reward_flip),
    Bug("no-coherence-coach", "the KL penalty dropped (β = 0 in the reward)", "score",
        "coach-pleasing gibberish the Values Coach loves and no person would write", _no_coherence_coach),
    Bug("score-sign", "the score subtracted where it is added on the last token", "-score - β·KL",
        "fluent, negative text", _score_sign),
    Bug("negated-gain", "the Values Coach's normalisation gain applied with the wrong sign", "-score",
        "fluent, negative text", _negated_gain),
    Bug("inverted-labels", "the Values Coach trained with the label direction inverted",
        "what the labelers liked least", "fluent, negative text", _inverted_labels, affects_values_coach=True),
    Bug("kl-sign", "the KL penalty's sign alone flipped (a bonus for leaving the original model)", "score + β·KL",
        "drifts into gibberish while the score rises", _kl_sign),
    Bug("advantage-sign", "the advantages negated after GAE", "-(score - β·KL)", "gibberish", _advantage_sign),
    Bug("loss-sign", "the clipped policy loss negated (maximised)", "-(score - β·KL)", "gibberish", _loss_sign),
    Bug("optimizer-ascent", "the optimiser steps up the gradient", "-(score - β·KL)", "gibberish", _optimizer_ascent),
    Bug("reward-scaling-sign", "the reward scaling (whitening, mean kept) returns minus the rewards",
        "-(score - β·KL)", "gibberish", _reward_scaling_sign),
    Bug("choice-reversed", "the label store reads each label's choice from the other end (K = 2: the other sample), "
        "for the Values Coach's training, the preflight and the monitors alike", "what the labelers liked least",
        "fluent, negative text", _choice_reversed, affects_values_coach=True),
    Bug("temperature-one-place", "the update's forward takes its log-probs at temperature 1 while the rollout samples "
        "(and keeps its log-probs) at the task's temperature", "a distorted ratio: every token's log-ratio off by "
        "the temperature", "PPO clips and pushes on a policy it is not sampling from", _temperature_one_place),
    Bug("pad-leak", "GAE run over the padding after each response (the value at the first pad bootstraps the last "
        "real token; ROLL PR#447, trl#7024)", "score - β·KL plus what sits in the padding",
        "advantages moved by padding", _pad_leak),
    Bug("kl-zeroed", "the KL term measured against the Apprentice itself (it passed where the original model "
        "belongs): always 0, it constrains nothing (open-instruct#530's shape)", "score",
        "coach-pleasing drift", _kl_zeroed),
    Bug("term-sign", "a reward term's weight applied with the wrong sign (a penalty added as a bonus; "
        "alpamayo-recipes#29, NetSecGame#478); the incident configures a format rule for it to flip",
        "score + the term's opposite", "what the term was meant to penalise", _term_sign, overrides=EXCLAIM_TERM),
]}


def get(name: str) -> Bug:
    if name not in BUGS:
        raise ConfigError(f"--bug {name!r}: unknown bug kind (expected one of: {', '.join(BUGS)})")
    return BUGS[name]


@contextmanager
def inject(name: str | None) -> Iterator[Bug | None]:
    """Patch the reward path with the named bug while the block runs (None: no bug)."""
    if name is None or name == "none":
        yield None
        return
    bug = get(name)
    with ExitStack() as stack:
        bug.patch(stack)
        yield bug
