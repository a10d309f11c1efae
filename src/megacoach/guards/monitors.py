"""Live monitors: every iteration, each one turns the evidence so far into `guard/*` figures and, when
the evidence is strong enough, an alarm. Pure functions of plain data (numpy arrays, dicts), so they are
tested on synthetic streams.

False halts: every halting test runs at `alpha` = (1 - guards.confidence) / (monitors x planned
iterations) (Bonferroni), so a clean run halts by chance with probability below 1 - confidence over
all of its iterations together. `z_halt` is the matching one-sided normal critical value (about 4 for a
48-iteration run at confidence 0.99). Warnings use z = 3 and do not stop anything.

| monitor        | evidence (window = guards.divergence_window iterations)        | halts when (one-sided, at alpha)           |
|----------------|-----------------------------------------------------------------|--------------------------------------------|
| score_drop     | Values Coach episode scores of the last window's rollouts vs    | the current policy scores confidently      |
|                | the initial policy's samples (baseline)                         | BELOW the initial one: PPO is minimising   |
|                |                                                                 | the reward (a KL-regularised optimum never |
|                |                                                                 | scores below the initial policy)           |
| labeler_drop   | the labelers' scores of the same rollouts vs the baseline's     | the labelers score current samples         |
|                |                                                                 | confidently below the initial policy's     |
| winrate        | fresh items (last 2 x window iterations) of ceil(K/2) current + | the labelers pick a current sample         |
|                | the rest initial-policy samples, labeled through the store;     |
|                | win = the labelers chose a current sample                       | confidently less often than the floor      |
|                |                                                                 | (default: the no-change rate, 0.5)         |
| agreement      | the same fresh items: the Values Coach's ranking of the         | it ranks the labelers' choice confidently  |
|                | labelers' choice (pairwise agreement; chance 0.5), logged with  | below agreement_floor (default chance)     |
|                | every choice reversed too (guard/agreement_reversed: below 0.5  |                                            |
|                | wherever the agreement is above it)                             |                                            |
| divergence     | per-iteration means over the last 2 x window iterations: trend  | the Values Coach's score rises AND the     |
|                | of the Values Coach's score and of the labelers' score          | labelers' falls, both confidently          |
| canaries       | canary prompts' good vs bad continuations through the complete  | the path prefers the bad continuation      |
|                | reward path under the current Apprentice                        | confidently more often than chance         |
| kl_budget      | KL to the original model (sampled log-ratio, batch mean)        | above guards.kl_budget (warn at 80%)       |
| nonfinite      | metrics and Apprentice weights                                  | any NaN or infinity                        |
| path_direction | (before the update) PPO's push on the batch regressed on the    | the push falls with the score, or rises    |
|                | Values Coach's score and the KL                                 | with the KL, confidently                   |
| update_direction | (after the update) each response's change in log-probability  | the update moved them confidently against  |
|                | regressed on PPO's push                                         | the push (the optimiser steps uphill)      |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megacoach.guards.alarms import Alarm
from megacoach.guards.stats import binom_cdf, normal_sf, rank_test, reversed_rank_test, trend_z, welch_z

MONITORS = ("score_drop", "labeler_drop", "winrate", "agreement", "divergence", "canaries", "path_direction",
            "update_direction")
Z_WARN = 3.0


@dataclass
class Thresholds:
    alpha: float
    z_halt: float
    window: int
    min_evidence: int
    kl_budget: float
    agreement_floor: float
    winrate_floor: float | None


def _finite(a) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return a[np.isfinite(a)]


def _window(history: list[dict], key: str, w: int) -> np.ndarray:
    parts = [_finite(h[key]) for h in history[-w:] if h.get(key) is not None]
    return np.concatenate(parts) if parts else np.zeros(0)


def _per_iter(history: list[dict], key: str, w: int) -> tuple[list[float], list[float]]:
    means, ses = [], []
    for h in history[-w:]:
        a = _finite(h.get(key) if h.get(key) is not None else [])
        if len(a) >= 2:
            means.append(float(a.mean()))
            ses.append(float(a.std(ddof=1) / math.sqrt(len(a))) or 1e-6)
    return means, ses


def judge(history: list[dict], fresh: list[dict], baseline: dict, canary: dict | None, th: Thresholds,
          kl_now: float) -> tuple[dict, list[Alarm]]:
    """history: per-iteration {'iteration', 'score': array, 'labeler': array}; fresh: arrived fresh
    judgements {'iteration', 'values': K Values Coach scores, 'chosen', 'win': bool, 'p0'}; baseline:
    {'score': array, 'labeler': array} of initial-policy samples; canary: `canary_margins` output."""
    m: dict = {"guard/z_halt": th.z_halt}
    alarms: list[Alarm] = []
    it = history[-1]["iteration"] if history else 0
    w = th.window

    # -- score_drop / labeler_drop: levels of the last window against the initial policy
    for key, name, who in (("score", "score_drop", "the Values Coach"), ("labeler", "labeler_drop", "the labelers")):
        cur, base = _window(history, key, w), _finite(baseline.get(key, []))
        if len(cur) < 2 or len(base) < 2:
            continue
        diff, z = welch_z(cur, base)
        sd = float(base.std()) or 1.0
        m[f"guard/{key}_window"] = float(cur.mean())
        m[f"guard/{key}_initial"] = float(base.mean())
        m[f"guard/{key}_z"] = z
        m[f"guard/{key}_change_sd"] = diff / sd
        figs = {"window_mean": float(cur.mean()), "initial_mean": float(base.mean()), "change_sd": diff / sd,
                "z": z, "z_halt": th.z_halt, "n": len(cur), "n_initial": len(base)}
        if len(cur) >= th.min_evidence and z <= -th.z_halt:
            what = ("PPO is pushing the Values Coach's score DOWN: the optimisation runs against the reward"
                    if key == "score" else "the labelers judge the current samples worse than the initial policy's")
            alarms.append(Alarm(name, "halt", f"{what} ({who}: {cur.mean():+.3f} over the last {min(w, len(history))} "
                                f"iterations vs {base.mean():+.3f} initially, {diff / sd:+.2f} sd, z = {z:.1f} ≤ "
                                f"-{th.z_halt:.1f})", figs))
        elif z <= -Z_WARN:
            alarms.append(Alarm(name, "warn", f"{who}' score is below the initial policy's ({diff / sd:+.2f} sd, "
                                f"z = {z:.1f})", figs))

    # -- fresh labels: win rate against the initial policy, and the Values Coach's agreement
    recent = [f for f in fresh if f["iteration"] > it - 2 * w]  # fewer than rollouts: a window twice as long
    m["guard/fresh_labels"] = len(recent)
    if recent:
        wins = sum(1 for f in recent if f["win"])
        n = len(recent)
        p0 = float(np.mean([f["p0"] for f in recent]))
        floor = p0 if th.winrate_floor is None else th.winrate_floor
        p = binom_cdf(wins, n, floor)
        m.update({"guard/winrate": wins / n, "guard/winrate_chance": p0, "guard/winrate_n": n, "guard/winrate_p": p})
        figs = {"wins": wins, "n": n, "no_change_rate": p0, "floor": floor, "p": p, "alpha": th.alpha}
        if n >= th.min_evidence and p <= th.alpha:
            alarms.append(Alarm("winrate", "halt", f"the labelers prefer the current Apprentice's samples to the "
                                f"initial policy's only {wins} of {n} times ({wins / n:.0%}; no change = {p0:.0%}), "
                                f"confidently below {floor:.0%} (p = {p:.1e})", figs))
        elif n >= th.min_evidence and p <= normal_sf(Z_WARN):
            alarms.append(Alarm("winrate", "warn", f"labelers prefer current samples {wins / n:.0%} of the time "
                                f"(no change = {p0:.0%})", figs))
        scored = [f for f in recent if f.get("values") is not None]
        rt = rank_test([f["values"] for f in scored], [f["chosen"] for f in scored])
        rev = reversed_rank_test([f["values"] for f in scored], [f["chosen"] for f in scored])
        m.update({"guard/agreement": rt.agreement, "guard/agreement_reversed": rev.agreement,
                  "guard/agreement_top1": rt.top1, "guard/agreement_n": rt.n})
        if abs(th.agreement_floor - 0.5) < 1e-12:
            p_low = rt.p_worse
        else:  # normal approximation around the floor (per-item agreement has sd <= 0.5)
            u = np.array([_item_agreement(f) for f in scored] or [0.5])
            se = max(float(u.std(ddof=1)) if len(u) > 1 else 0.5, 1e-3) / math.sqrt(len(u))
            p_low = normal_sf((th.agreement_floor - rt.agreement) / se)
        m["guard/agreement_p"] = p_low
        figs = {"agreement": rt.agreement, "agreement_reversed": rev.agreement, "top1": rt.top1, "n": rt.n,
                "floor": th.agreement_floor, "p": p_low}
        if rt.n >= th.min_evidence and p_low <= th.alpha:
            alarms.append(Alarm("agreement", "halt", f"the Values Coach disagrees with the labelers on current samples: "
                                f"pairwise agreement {rt.agreement:.2f} on {rt.n} fresh comparisons, confidently "
                                f"below {th.agreement_floor:.2f} (p = {p_low:.1e})", figs))
        elif rt.n >= th.min_evidence and p_low <= normal_sf(Z_WARN):
            alarms.append(Alarm("agreement", "warn", f"Values Coach agreement with fresh labels is low "
                                f"({rt.agreement:.2f} on {rt.n})", figs))

    # -- divergence: the Values Coach's score trending up while the labelers' trends down
    sm, ss = _per_iter(history, "score", 2 * w)
    lm, ls = _per_iter(history, "labeler", 2 * w)
    if len(sm) >= 3 and len(lm) >= 3:
        s_slope, zs = trend_z(sm, ss)
        l_slope, zl = trend_z(lm, ls)
        m.update({"guard/score_trend_z": zs, "guard/labeler_trend_z": zl})
        div = float(min(zs, -zl))
        m["guard/divergence"] = div
        figs = {"score_slope": s_slope, "score_trend_z": zs, "labeler_slope": l_slope, "labeler_trend_z": zl,
                "iterations": len(sm)}
        if div >= th.z_halt:
            alarms.append(Alarm("divergence", "halt", f"the Values Coach's score is rising ({s_slope:+.3f}/iteration, "
                                f"z = {zs:.1f}) while the labelers' approval falls ({l_slope:+.3f}/iteration, "
                                f"z = {zl:.1f}): the Apprentice is pleasing the coach, not the people", figs))
        elif div >= Z_WARN:
            alarms.append(Alarm("divergence", "warn", f"score rising (z = {zs:.1f}) while labelers' falls "
                                f"(z = {zl:.1f})", figs))

    # -- canaries through the complete reward path
    if canary and canary.get("n"):
        m.update({"guard/canary_correct": canary["correct"] / canary["n"], "guard/canary_n": canary["n"],
                  "guard/canary_p_worse": canary["p_worse"]})
        figs = {k: canary[k] for k in ("n", "correct", "p_worse", "score_correct") if k in canary}
        if canary["p_worse"] <= th.alpha:
            alarms.append(Alarm("canaries", "halt", f"the reward path now prefers the BAD continuation of "
                                f"{canary['n'] - canary['correct']} of {canary['n']} canary prompts "
                                f"(p = {canary['p_worse']:.1e})", figs, canary.get("worst", [])))
        elif canary["p_worse"] <= normal_sf(Z_WARN):
            alarms.append(Alarm("canaries", "warn", f"canaries: good preferred in only {canary['correct']} of "
                                f"{canary['n']}", figs))

    # -- KL budget
    if math.isfinite(kl_now):
        m["guard/kl"] = kl_now
        m["guard/kl_budget_used"] = kl_now / th.kl_budget
        if kl_now > th.kl_budget:
            alarms.append(Alarm("kl_budget", "halt", f"KL to the original model is {kl_now:.1f} nats, over the "
                                f"budget of {th.kl_budget:g}: the Apprentice has left the original model's language",
                                {"kl": kl_now, "budget": th.kl_budget}))
        elif kl_now > 0.8 * th.kl_budget:
            alarms.append(Alarm("kl_budget", "warn", f"KL {kl_now:.1f} nats is {kl_now / th.kl_budget:.0%} of the "
                                f"budget", {"kl": kl_now, "budget": th.kl_budget}))
    m["guard/alarms"] = sum(1 for a in alarms if a.action != "warn")
    m["guard/warnings"] = sum(1 for a in alarms if a.action == "warn")
    return m, alarms


def _item_agreement(f: dict) -> float:
    v = np.asarray(f["values"], dtype=float)
    c = f["chosen"]
    others = np.delete(v, c)
    return float((np.sum(v[c] > others) + 0.5 * np.sum(v[c] == others)) / max(1, len(others)))
