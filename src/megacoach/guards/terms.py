"""Each reward term's direction, proved on its own examples (`reward.terms`, megacoach/reward/terms.py).

    term_directions(trainer)   per term: its weighted score of each example's better and worse response (through
                               `objective.term_total`, as the reward path sums it), and PPO's push on each with the
                               Values Coach's score held fixed, the term on against the term off
    check_terms(trainer)       (passed, message, figures, failing term): every example must be ranked the right way,
                               alone and through PPO's push

The live side (`term_metrics`): each term's weighted mean on the batch and its correlation with the labelers'
scores, logged every iteration as guard/term/<name> and guard/term/<name>_labeler_r.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from megacoach.guards import probe as P
from megacoach.ppo import episodes, objective
from megacoach.reward import terms as reward_terms
from megacoach.tasks import Query, query_token_ids


def _responses(trainer, text: str) -> list[int]:
    tok, task = trainer.tok, trainer.cfg.task
    ids = tok(text)["input_ids"][: task.response_length]
    if task.stop_at_eos and len(ids) < task.response_length:  # a whole response: it ends where the Apprentice's would
        ids = ids + [tok.eos_token_id]
    return ids


def term_directions(trainer) -> list[dict]:
    """Per term: {'name', 'alone' [n_examples] (weighted better - worse), 'push' [n_examples] (the term's part of
    PPO's push, better - worse)}."""
    terms = trainer.terms
    out = []
    for i, term in enumerate(terms):
        weights = reward_terms.weights_of([term])
        qs = [q for q, _, _ in term.examples for _ in (0, 1)]
        texts = [x for _, better, worse in term.examples for x in (better, worse)]
        values = reward_terms.term_values([term], qs, texts)
        alone = objective.term_total(values, weights).numpy()
        queries = [Query(q, query_token_ids(trainer.cfg.task, trainer.tok, q)) for q in qs]
        with P.scratch(trainer):
            b = episodes.build(trainer, queries, [_responses(trainer, x) for x in texts])
            only = torch.zeros_like(b.terms)
            only[:, i] = b.terms[:, i]
            fixed = torch.zeros_like(b.raw_scores)
            on = P.with_scores(trainer, replace(b, terms=only), fixed, torch.ones_like(b.valid))
            off = P.with_scores(trainer, replace(b, terms=torch.zeros_like(b.terms)), fixed, torch.ones_like(b.valid))
            push = (P.ppo_push(trainer, on) - P.ppo_push(trainer, off)).float().cpu().numpy()
        out.append({"name": term.name, "weight": term.weight, "alone": (alone[0::2] - alone[1::2]).tolist(),
                    "push": (push[0::2] - push[1::2]).tolist()})
    return out


def check_terms(trainer) -> tuple[bool, str, dict, str | None]:
    """(passed, message, figures, the first failing term's name)."""
    if not trainer.terms:
        return True, "no reward terms (reward.terms): the Values Coach's score alone", {}, None
    found = term_directions(trainer)
    figs = {d["name"]: d for d in found}
    for d in found:
        wrong_alone = [j for j, x in enumerate(d["alone"]) if not x > 0]
        wrong_push = [j for j, x in enumerate(d["push"]) if not x > 0]
        if wrong_alone or wrong_push:
            term = next(t for t in trainer.terms if t.name == d["name"])
            j = (wrong_alone or wrong_push)[0]
            q, better, worse = term.examples[j]
            where = ("its weighted score" if wrong_alone else "PPO's push (the Values Coach's score held fixed)")
            n_wrong = len(wrong_alone or wrong_push)
            return False, (f"reward term {d['name']!r} (weight {d['weight']:+g}) points the wrong way: {where} does "
                           f"not prefer the better response in {n_wrong} of {len(d['alone'])} of its examples, e.g. "
                           f"{better[:60]!r} over {worse[:60]!r} — its sign is inverted (a penalty added as a bonus, or "
                           f"a scorer counting what it should penalise)"), figs, d["name"]
    names = ", ".join(f"{d['name']} ({len(d['alone'])})" for d in found)
    return True, (f"every reward term prefers the better response of each of its examples, alone and through PPO's "
                  f"push with the Values Coach's score held fixed: {names}"), figs, None


def term_metrics(trainer, batch, labeler_scores: np.ndarray) -> dict[str, float]:
    """guard/term/<name>: the term's weighted mean on the batch; guard/term/<name>_labeler_r: its correlation with
    the labelers' scores of the same responses (where they scored them)."""
    if not trainer.terms or batch.terms is None:
        return {}
    m: dict[str, float] = {}
    ls = np.asarray(labeler_scores, dtype=float)
    for i, t in enumerate(trainer.terms):
        v = batch.terms[:, i].float().cpu().numpy() * t.weight
        m[f"guard/term/{t.name}"] = float(v.mean())
        if len(ls) == len(v) and len(v) > 3 and v.std() > 0 and ls.std() > 0:
            r = float(np.corrcoef(v, ls)[0, 1])
            m[f"guard/term/{t.name}_labeler_r"] = r
            m[f"guard/term/{t.name}_labeler_z"] = math.atanh(max(-0.999999, min(0.999999, r))) * math.sqrt(len(v) - 3)
    return m
