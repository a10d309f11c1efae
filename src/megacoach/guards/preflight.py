"""Preflight: before PPO's first update (and on resume, and after every Values Coach (re)load), prove
that the reward path pushes the Apprentice TOWARDS what the human evaluators prefer.

Each check is a one-sided test at the stated confidence (`guards.confidence`, default 0.99): the check
passes only if "the reward path points the right way" beats "it is unrelated (or opposite)" at that
confidence. A failure names the component of the reward path where the direction is lost.

0. `label_store`       labels with known choices written to a scratch store of the run's store class and read
                       back through the Values Coach's data path: each choice must land on the sample it named
                       (a path that reads the choice reversed is invisible to every other check: the Values
                       Coach learns the reversed labels and then agrees with them).
1. `ppo_loss`          synthetic log-probs and advantages: minus the loss gradient has the advantage's
                       sign on every token (`objective.ppo_loss` moves log-probs the right way).
2. `values_coach`      held-out labeled comparisons from the store: the Values Coach's score ranks the labelers'
                       choice above the other samples better than chance (exact rank test); the agreement with
                       every choice reversed is reported beside it and must fall below chance.
3. `reward_path`       the same comparisons, each sample treated as a response the Values Coach scores: the
                       complete quantity PPO pushes up — episode score, the KL term, reward scaling, GAE,
                       advantage whitening, and the gradient of the actual loss — ranks the choice better
                       than chance. On failure the first stage whose ranking is no longer better than
                       chance is named. The invalid-response penalty (a fixed task rule, blind to the
                       labels) is checked apart: it must reach exactly the invalid responses, and the path
                       with it may not rank the labelers' choice significantly below chance.
3b. `reward_terms`     each reward term (`reward.terms`) on its own examples: its weighted score, and its part of
                       PPO's push (the Values Coach's score held fixed, the term on against off), must prefer
                       every example's better response; an inverted term is refused by name (guards/terms.py).
4. `coherence_coach`   copies of the Apprentice moved away from the original model (Gaussian noise on the
                       weights that train — with LoRA, the adapter's — at levels calibrated to ~2 and ~8
                       nats): the reward path's KL term must fall as the exact KL (from the full next-token
                       distributions) grows, at a slope of at least half of -beta; and, with the score held
                       fixed, the Megacoach reward and PPO's push must fall with the KL as well.
5. `optimiser`         one optimiser step of PPO's update (`trainer.update` with its loop cut to one step over
                       the whole probe batch; on the trainer itself, then restored exactly) on response pairs
                       with advantages +1 / -1, against the same step with the signs swapped (cancelling Adam's
                       momentum mid-run): the +1 response's log-probability rises relative to its pair's in
                       significantly more than half the pairs. (A whole epoch of minibatch steps buries each
                       pair's own step under the others' on a small model; the full update's direction is
                       watched after every real update by the `update_direction` monitor.)
5b. `sampler_trainer`  a rollout of the probe queries and PPO's update on it, stopped before its optimiser step:
                       the trainer's log-probs of the sampled tokens must equal the sampler's (PPO's first ratio
                       is 1 by construction) within float rounding at the Apprentice's precision
                       (guards/rollout.py; the same check runs before the first step of every update).
5c. `padding`         every position outside the masks of a rollout perturbed (more padding around the Values
                       Coach's input, other token ids after each response's end, junk log-probs, values,
                       advantages and returns there): nothing at real tokens may move — scores, log-probs,
                       values, rewards, advantages, returns, the PPO loss and its gradients (guards/padding.py;
                       without stops, masks of random lengths are drawn for the reward path and the loss).
6. `canaries`          canary prompts with known good and bad continuations, through the complete path: a
                       ranking significantly WORSE than chance fails; not better than chance only warns
                       (hand-written canaries can be off the Values Coach's distribution).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from megacoach.guards import probe as P
from megacoach.guards.alarms import GuardFailure
from megacoach.guards.labelcheck import roundtrip_choices
from megacoach.guards.padding import padding_leaks
from megacoach.guards.terms import check_terms
from megacoach.guards.rollout import COMPONENT as SAMPLER_TRAINER
from megacoach.guards.rollout import check_sampler_trainer
from megacoach.guards.stats import ols, rank_test, reversed_rank_test, sign_test, t_sf
from megacoach.lm.adapters import has_adapter
from megacoach.ppo import episodes, objective
from megacoach.reward import terms as reward_terms
from megacoach.progress import StageProgress
from megacoach.tasks import Query


@dataclass
class Check:
    name: str
    component: str
    passed: bool
    message: str
    figures: dict = field(default_factory=dict)
    warning: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 2)
        return d


COMPONENTS = {
    "heldout_labels": "held-out labels",
    "label_store": "label store (the labelers' choice read back: LabelStore.comparisons → reward.data)",
    "ppo_loss": "PPO loss (objective.ppo_loss)",
    "sampler_trainer": SAMPLER_TRAINER,
    "padding": "padding and masks (episodes → objective.run_reward_path → objective.ppo_loss)",
    "reward_terms": "reward terms (reward.terms, summed by objective.episode_scores)",
    "values_coach": "Values Coach (episodes.values_coach_scores: reward-model head, normalisation gain, label direction)",
    "reward_path": "reward path (score → Megacoach reward → advantages → PPO loss)",
    "coherence_coach": "Coherence Coach (the KL term: objective.kl_per_token, β, objective.megacoach_rewards)",
    "optimiser": "optimiser step (PPOTrainer.update and its optimiser)",
    "canaries": "canary prompts through the reward path",
}


def _fmt_p(p: float) -> str:
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


# ------------------------------------------------------------------------------------------ 1. the loss
def check_ppo_loss(trainer, alpha: float, seed: int) -> Check:
    gen = torch.Generator(device="cpu").manual_seed(seed)  # the same synthetic batch on every device
    B, T = 16, max(2, trainer.cfg.task.response_length)
    dev = trainer.device
    old = (-torch.rand(B, T, generator=gen, device="cpu") * 5).to(dev)
    adv = torch.randn(B, T, generator=gen, device="cpu").to(dev)
    values = (torch.randn(B, T, generator=gen, device="cpu") * 0.1).to(dev)
    p = trainer.cfg.ppo
    with torch.enable_grad():
        new = old.clone().requires_grad_(True)
        loss, _ = objective.ppo_loss(new, old, adv, values.clone(), values, values.clone(), p.cliprange,
                                     p.cliprange_value, p.vf_coef)
        (grad,) = torch.autograd.grad(loss, new, allow_unused=True)
    if grad is None:
        return Check("ppo_loss", COMPONENTS["ppo_loss"], False, "the loss does not depend on the new log-probabilities")
    push = -grad
    nz = push != 0
    agree = (torch.sign(push) == torch.sign(adv)) & nz
    frac_nz = float(nz.float().mean())
    frac_ok = float(agree.sum() / nz.sum().clamp(min=1))
    ok = frac_nz >= 0.5 and frac_ok >= 0.99
    msg = (f"minus the loss gradient has the advantage's sign on {frac_ok:.0%} of {int(nz.sum())} tokens"
           + ("" if ok else ": the loss pushes log-probabilities against the advantages"))
    return Check("ppo_loss", COMPONENTS["ppo_loss"], ok, msg, {"agree": frac_ok, "nonzero": frac_nz})


# ------------------------------------------------------------------------------------------ 0. the labels' direction
def check_label_store(store) -> Check:
    """Labels with known choices written to a scratch store of the run's store class and read back as the Values
    Coach's training reads them (guards/labelcheck.py): every choice must land on the sample it named."""
    problems = roundtrip_choices(type(store))
    if not problems:
        return Check("label_store", COMPONENTS["label_store"], True, "labels written with known choices (K = 2 and "
                     "4) read back through the store and the Values Coach's data path choose the samples they named")
    return Check("label_store", COMPONENTS["label_store"], False, "the labelers' choice is read wrongly on its way to "
                 "the Values Coach: " + "; ".join(problems) + " — labels read this way would be scored as agreement "
                 "with the reversed choice", {"problems": problems})


# ------------------------------------------------------------------------------------------ 2-3. labels
def heldout(store, limit: int) -> list:
    comps = [c for c in store.comparisons(split="valid") if not c.flagged and c.k >= 2]
    return comps[-limit:] if limit else comps


def labeled_batch(trainer, comps):
    queries, responses, rows = [], [], []
    for c in comps:
        q = Query(c.query_text, list(c.query_token_ids))
        start = len(queries)
        for s in c.samples:
            queries.append(q)
            responses.append(list(s.token_ids))
        rows.append((start, c.k, c.chosen))
    return episodes.build(trainer, queries, responses), rows


def _grouped(values: np.ndarray, rows) -> list[np.ndarray]:
    return [values[s:s + k] for s, k, _ in rows]


def check_labels(trainer, comps, alpha: float) -> tuple[Check, Check, dict]:
    """(values_coach check, reward_path check, per-stage rank tests).

    The direction test puts every labeled sample through the complete path as a response the Values Coach
    scores (validity forced on): the invalid-response penalty is a fixed task rule, the same for whatever the
    labelers preferred, and with most early samples invalid it would drown the direction in ties. The path as
    it stands (penalty included) is ranked too: it may not be significantly WORSE than chance; and the penalty
    must reach exactly the invalid responses, the Values Coach's score exactly the valid ones."""
    batch, rows = labeled_batch(trainer, comps)
    chosen = [c for _, _, c in rows]
    scored = P.with_scores(trainer, batch, batch.raw_scores, torch.ones_like(batch.valid))
    st = P.stages(trainer, scored)
    tests = {name: rank_test(_grouped(v, rows), chosen) for name, v in st.items()}
    as_is = rank_test(_grouped(P.ppo_push(trainer, batch).cpu().numpy(), rows), chosen)
    figs = {name: t.as_dict() for name, t in tests.items()}
    figs["with_penalty"] = as_is.as_dict()
    figs["valid_share"] = float(batch.valid.float().mean())
    vc = tests["values_coach"]
    rev = reversed_rank_test(_grouped(st["values_coach"], rows), chosen)  # the same figure, every choice reversed
    figs["values_coach_reversed"] = rev.as_dict()
    blind = vc.agreement > 0.5 and rev.agreement >= 0.5
    vc_ok = vc.p_better <= alpha and not blind
    vc_msg = (f"on {vc.n} held-out comparisons the Values Coach ranks the labelers' choice first in {vc.top1:.0%} "
              f"(chance {1 / np.mean([k for _, k, _ in rows]):.0%}), pairwise agreement {vc.agreement:.2f} "
              f"(chance 0.50; with every choice reversed {rev.agreement:.2f}), p = {_fmt_p(vc.p_better)}")
    if blind:
        vc_msg += (" — the agreement does not fall below chance when every choice is reversed: it does not read "
                   "which sample the labelers chose")
    elif not vc_ok:
        vc_msg += (" — it does not agree with the labels better than chance" if vc.p_worse > alpha else
                   " — it ranks what the labelers preferred BELOW the rest (inverted)")
    # the penalty rule, as the path applies it
    pen = float(trainer.cfg.task.penalty_reward)
    sc, raw, valid = batch.path.scores.float(), batch.raw_scores.float(), batch.valid
    wrong_pen = int((~valid & ((sc - pen).abs() > 1e-5)).sum())
    if batch.terms is not None and trainer.terms:  # the reward terms' weighted sum rides on the Values Coach's score
        raw = raw + objective.term_total(batch.terms, reward_terms.weights_of(trainer.terms, batch.terms.device))
    wrong_val = int((valid & ((sc - raw).abs() > 1e-4 * (1 + raw.abs()))).sum())
    final = tests["ppo_push"]
    path_ok = final.p_better <= alpha and as_is.p_worse > alpha and not (wrong_pen or wrong_val)
    comp = COMPONENTS["reward_path"]
    if path_ok:
        path_msg = (f"PPO's push (the actual loss gradient on each sample) ranks the labelers' choice first in "
                    f"{final.top1:.0%}, pairwise agreement {final.agreement:.2f}, p = {_fmt_p(final.p_better)} "
                    f"(with the invalid-response penalty on the {1 - figs['valid_share']:.0%} invalid samples: "
                    f"agreement {as_is.agreement:.2f})")
    elif wrong_pen or wrong_val:
        comp = P.STAGES["episode_score"]
        path_msg = (f"the episode score gives {wrong_pen} invalid responses something other than the penalty "
                    f"({pen:g}) and {wrong_val} valid responses something other than the Values Coach's score")
    elif final.p_better > alpha:
        order = list(P.STAGES)
        bad = next((s for s in order if tests[s].p_better > alpha), "ppo_push")
        prev = order[order.index(bad) - 1] if order.index(bad) > 0 else None
        comp = P.STAGES[bad]
        how = "BELOW the rest" if tests[bad].p_worse <= alpha else "no better than chance"
        path_msg = (f"PPO would push the labelers' choice {how}: the ranking is lost at {bad} "
                    f"(agreement {tests[bad].agreement:.2f}, p = {_fmt_p(tests[bad].p_better)})"
                    + (f" after {prev} (agreement {tests[prev].agreement:.2f})" if prev else ""))
    else:
        path_msg = (f"with the invalid-response penalty the path ranks the labelers' choice BELOW the rest "
                    f"(agreement {as_is.agreement:.2f}, p = {_fmt_p(as_is.p_worse)})")
    return (Check("values_coach", COMPONENTS["values_coach"], vc_ok, vc_msg,
                  {**figs["values_coach"], "reversed": figs["values_coach_reversed"]}),
            Check("reward_path", comp, path_ok, path_msg, figs), tests)


# ------------------------------------------------------------------------------------------ 4. KL term
def _kl_levels(trainer, queries, seed: int, target: float = 2.0):
    """Noise scales that move the Apprentice ~target and ~4*target nats (per response) from where it is."""
    with P.scratch(trainer):
        base = trainer.rollout(queries)
    qr = base.query_responses
    start = float(P.exact_kl(trainer, qr, mask=base.mask).mean())
    sigma = 0.05
    for _ in range(8):  # KL grows about as sigma^2: aim at the target in a few steps
        with P.scratch(trainer):
            P.perturb_(trainer.apprentice.lm, sigma, seed)
            moved = float(P.exact_kl(trainer, qr, mask=base.mask).mean()) - start
        if target <= moved <= 3 * target:
            break
        sigma *= float(np.clip(np.sqrt(1.5 * target / max(moved, 1e-4)), 0.25, 8.0))
    found = sigma
    return start, (found or sigma)


def check_coherence_coach(trainer, queries, alpha: float, seed: int, require_kl: bool) -> Check:
    beta = float(trainer.kl_ctl.value)
    start, sigma = _kl_levels(trainer, queries, seed)
    xs, ns, per_level = [], [], []
    for s in (0.0, sigma, 2 * sigma):
        with P.scratch(trainer):
            if s > 0:
                P.perturb_(trainer.apprentice.lm, s, seed)
            b = trainer.rollout(queries)
            ex = P.exact_kl(trainer, b.query_responses, mask=b.mask).numpy()
            non_score = b.path.non_score.float().sum(1).cpu().numpy()
            # the score held fixed: what the path does with the KL alone, on the furthest copy
            fixed = P.with_scores(trainer, b, torch.zeros_like(b.raw_scores), torch.ones_like(b.valid))
            log_ratio = objective.sequence_kl(b.logprobs.float(), b.ref_logprobs.float(), b.mask).cpu().numpy()
            reward = fixed.path.rewards.float().sum(1).cpu().numpy()
            push = P.ppo_push(trainer, fixed).cpu().numpy()
        xs.append(ex), ns.append(non_score)
        per_level.append({"sigma": s, "exact_kl": float(ex.mean()), "kl_term": float(non_score.mean()),
                          "log_ratio": float(log_ratio.mean())})
    x = np.concatenate(xs)
    # the KL term against the exact KL, over all three distances (its level must fall as the policy leaves);
    # the reward and the push against each episode's sampled log-ratio, within the furthest batch (advantages
    # are whitened per batch, so only their spread within a batch carries the direction)
    fits = {"kl_term": ols(np.concatenate(ns), x), "reward": ols(reward, log_ratio), "push": ols(push, log_ratio)}
    figs = {"beta": beta, "levels": per_level, "sigma": sigma}
    for name, f in fits.items():
        figs[f"{name}_slope"] = None if f is None else float(f.coef[1])
        figs[f"{name}_t"] = None if f is None else float(f.t[1])
    spread = float(x.max() - x.min())
    if spread < 0.5:
        msg = (f"could not move a copy of the Apprentice away from the original model (exact KL spread {spread:.2f} "
               "nats): the policy and reference look identical to the KL computation")
        if has_adapter(trainer.apprentice.lm):
            msg += (f" — with a LoRA adapter only the adapter moves (noise up to {2 * sigma:.3g}x the weights' RMS): "
                    "the frozen base, its final norm and LM head included, bounds how far the adapter can take the "
                    "model (a model whose next-token distributions are nearly uniform, as a random tiny one's are, "
                    "cannot be moved far); more of the model in ppo.lora_target_modules reaches further")
        return Check("coherence_coach", COMPONENTS["coherence_coach"], False, msg, figs)
    if beta <= 0 and require_kl:
        return Check("coherence_coach", COMPONENTS["coherence_coach"], False,
                     "β (the Coherence Coach's weight) is 0: nothing keeps the Apprentice near the original model "
                     "(set kl.init_kl_coef > 0, or guards.require_coherence_coach=false to allow it)", figs)
    problems = []
    f = fits["kl_term"]
    if f is None or not (f.p_negative(1) <= alpha and f.coef[1] <= -0.5 * beta):
        slope = float("nan") if f is None else float(f.coef[1])
        problems.append(f"the KL term (non-score reward) changes by {slope:+.3f} per nat of KL (expected about "
                        f"{-beta:+.3f}: it must FALL as the policy leaves the original model)")
    for name, what in (("reward", "the Megacoach reward"), ("push", "PPO's push")):
        f = fits[name]
        if beta > 0 and (f is None or not f.p_negative(1) <= alpha):
            slope = float("nan") if f is None else float(f.coef[1])
            t = float("nan") if f is None else float(f.t[1])
            problems.append(f"with the score held fixed, {what} changes by {slope:+.4f} per nat of sampled "
                            f"log-ratio (t = {t:.1f}): it must fall for responses that drifted further")
        elif beta == 0 and f is not None and f.p_positive(1) <= alpha:
            problems.append(f"{what} rewards drifting from the original model (t = {float(f.t[1]):.1f})")
    if not problems:
        msg = (f"moving the Apprentice {per_level[1]['exact_kl']:.1f} and {per_level[2]['exact_kl']:.1f} nats away: "
               f"the KL term falls {-figs['kl_term_slope']:.3f} per nat (β = {beta:.3f}); with the score fixed, the "
               f"reward and PPO's push fall with each response's log-ratio (t = {figs['reward_t']:.1f}, {figs['push_t']:.1f})")
        return Check("coherence_coach", COMPONENTS["coherence_coach"], True, msg, figs)
    return Check("coherence_coach", COMPONENTS["coherence_coach"], False, "; ".join(problems), figs)


# ------------------------------------------------------------------------------------------ 5. optimiser
def one_step_config(cfg, rows: int, world_size: int = 1):
    """The trainer's config with `PPOTrainer.update` cut to ONE optimiser step over all `rows` episodes (one epoch,
    one minibatch of them, accumulated over micro-batches of the configured size where they divide): the probe
    then measures what a single step does to each response, not the drift of a whole epoch of other minibatches'
    steps on top of it (which, on a small model, can bury the signal in noise)."""
    p = cfg.ppo
    micro = max(1, p.mini_batch_size // p.gradient_accumulation_steps)
    accum = rows // (micro * world_size) if rows % (micro * world_size) == 0 else 1
    ppo = p.model_copy(update={"batch_size": rows, "mini_batch_size": rows, "ppo_epochs": 1,
                               "gradient_accumulation_steps": accum})
    return cfg.model_copy(update={"ppo": ppo})


def check_optimiser(trainer, queries, alpha: float) -> Check:
    """One optimiser step of PPO's update (`trainer.update`) with advantages +1 / -1 on response pairs, and one from
    the same state with the signs swapped: the difference cancels whatever the optimiser's state (Adam's momentum)
    does on its own."""
    pairs = [q for q in queries for _ in (0, 1)]
    n = len(queries)
    sign = torch.tensor([1.0 if j % 2 == 0 else -1.0 for j in range(n)], device=trainer.device)
    per_ep = torch.stack([sign, -sign], 1).reshape(-1)  # pair j: episode 2j gets sign_j, 2j+1 the opposite
    with P.scratch(trainer):
        b = trainer.rollout(pairs)
    deltas, moved = [], True
    for flip in (1.0, -1.0):
        with P.scratch(trainer):
            adv = (flip * per_ep)[:, None].expand_as(b.logprobs).clone()
            b.path = objective.RewardPath(b.path.scores, b.path.kl, b.path.non_score, b.path.rewards, adv,
                                          b.values.clone())
            before = P.params_checksum(trainer.apprentice)
            trainer.cfg = one_step_config(trainer.cfg, len(pairs), trainer.dist.world_size)  # scratch restores it
            trainer.update(b)
            moved = moved and P.params_checksum(trainer.apprentice) != before
            after, _, _, _ = episodes.forward_old(trainer, b.query_responses)
            deltas.append(episodes.real(after.float() - b.logprobs.float(), b.mask).sum(1))
    dlogp = deltas[0] - deltas[1]  # what the advantages' sign did, the optimiser's own drift cancelled
    d = []
    for j in range(n):
        hi, lo = (2 * j, 2 * j + 1) if sign[j] > 0 else (2 * j + 1, 2 * j)
        d.append(float(dlogp[hi] - dlogp[lo]))
    d = np.array(d)
    pos, m, p_sign_more, p_sign_less = sign_test(d)
    # the sign test ignores sizes; a t test on the pair differences uses them: either may show the direction
    se = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    t = float(d.mean()) / se if se > 0 else (math.copysign(math.inf, float(d.mean())) if d.mean() else 0.0)
    p_more = min(p_sign_more, t_sf(t, len(d) - 1))
    p_less = min(p_sign_less, t_sf(-t, len(d) - 1))
    figs = {"pairs": n, "raised": pos, "nonzero": m, "p": p_more, "t": t, "mean_diff": float(d.mean()),
            "weights_moved": moved}
    if not moved:
        return Check("optimiser", COMPONENTS["optimiser"], False,
                     "PPOTrainer.update left the weights unchanged on a probe batch", figs)
    ok = p_more <= alpha
    msg = (f"one PPO optimiser step on {n} response pairs with advantages +1 / -1 (against the same step with the "
           f"signs swapped) raised the +1 response's log-probability relative to its pair's in {pos} of {m} pairs "
           f"(mean {d.mean():+.2e} nats, t = {t:.1f}), p = {_fmt_p(p_more)}")
    if not ok:
        msg += (": the optimiser step LOWERS what the advantages say to raise" if p_less <= alpha
                else ": not better than chance")
    return Check("optimiser", COMPONENTS["optimiser"], ok, msg, figs)


# ------------------------------------------------------------------------------------------ 5b. sampler vs trainer
def check_rollout(trainer, queries, gcfg) -> Check:
    """The trainer's log-probs of sampled responses against the sampler's, before an optimiser step (rollout.py)."""
    if not gcfg.rollout_check:
        return Check("sampler_trainer", COMPONENTS["sampler_trainer"], True, "switched off (guards.rollout_check=false)",
                     warning=True)
    ok, msg, figs = check_sampler_trainer(trainer, queries, one_step_config, gcfg.rollout_tolerance)
    return Check("sampler_trainer", COMPONENTS["sampler_trainer"], ok, msg, figs)


# ------------------------------------------------------------------------------------------ 3b. reward terms
def check_reward_terms(trainer) -> Check:
    """Each reward term's direction on its own examples, alone and through PPO's push (guards/terms.py)."""
    ok, msg, figs, bad = check_terms(trainer)
    comp = COMPONENTS["reward_terms"] if bad is None else f"reward term {bad!r} (reward.terms)"
    return Check("reward_terms", comp, ok, msg, figs)


# ------------------------------------------------------------------------------------------ 5c. padding
def check_padding(trainer, queries, seed: int) -> Check:
    """Every position outside the masks of a rollout perturbed; nothing at real tokens may move (padding.py)."""
    with P.scratch(trainer):
        batch = trainer.rollout(queries)
        leaks = padding_leaks(trainer, batch, seed)
    drawn = "" if batch.mask is not None else " (no stops: masks of random lengths drawn for the reward path and loss)"
    if not leaks:
        return Check("padding", COMPONENTS["padding"], True, "padding perturbed everywhere outside the masks moved "
                     "nothing at real tokens: Values Coach scores, log-probs, values, rewards, advantages, returns, "
                     "the PPO loss and its gradients" + drawn)
    named = ", ".join(f"{k} (by up to {v:.3g})" for k, v in leaks.items())
    return Check("padding", COMPONENTS["padding"], False, f"padding leaks into what PPO optimises: perturbing only "
                 f"positions outside the masks moved {named} at real tokens" + drawn, {"leaks": leaks})


# ------------------------------------------------------------------------------------------ 6. canaries
def canary_margins(trainer, canaries) -> dict:
    """Push and Values Coach score of each canary's good minus its bad continuation."""
    if not canaries:
        return {"n": 0}
    queries, responses = [], []
    for c in canaries:
        queries += [c.query, c.query]
        responses += [c.good_ids, c.bad_ids]
    b = episodes.build(trainer, queries, responses)
    st = P.stages(trainer, b)
    push, score = st["ppo_push"], st["values_coach"]
    dp = push[0::2] - push[1::2]
    ds = score[0::2] - score[1::2]
    pos, m, p_more, p_less = sign_test(dp)
    spos, sm, _, _ = sign_test(ds)
    return {"n": m, "correct": pos, "p_better": p_more, "p_worse": p_less, "push_diff": dp.tolist(),
            "score_correct": spos, "score_n": sm,
            "worst": [{"prompt": canaries[i].prompt[-80:], "good": canaries[i].good, "bad": canaries[i].bad,
                       "push_diff": float(dp[i])} for i in np.argsort(dp)[:3]]}


def check_canaries(trainer, canaries, alpha: float) -> tuple[Check, dict]:
    r = canary_margins(trainer, canaries)
    if r["n"] == 0:
        return Check("canaries", COMPONENTS["canaries"], True, "no informative canaries (none configured, or the "
                     "good and bad continuations tie)", r, warning=bool(canaries)), r
    ok = r["p_worse"] > alpha
    better = r["p_better"] <= alpha
    msg = (f"the complete reward path prefers the good continuation in {r['correct']} of {r['n']} canaries "
           f"(the Values Coach alone: {r['score_correct']} of {r['score_n']})")
    if not ok:
        msg += f": significantly WORSE than chance (p = {_fmt_p(r['p_worse'])})"
    elif not better:
        msg += " — not better than chance (warning only)"
    return Check("canaries", COMPONENTS["canaries"], ok, msg, {k: v for k, v in r.items() if k != "push_diff"},
                 warning=ok and not better), r


# ------------------------------------------------------------------------------------------ the lot
def run_preflight(trainer, store, canaries, gcfg, seed: int, probe_queries: list[Query], log=None) -> dict:
    """Run every check; return {'checks': [...], 'canaries': ...}; raise GuardFailure naming the first
    failing component (all checks' figures attached)."""
    alpha = 1.0 - gcfg.confidence
    checks: list[Check] = []
    comps = heldout(store, gcfg.preflight_comparisons)
    need = max(gcfg.min_heldout, math.ceil(math.log(1 / alpha) / math.log(max(2, min((c.k for c in comps), default=2)))))
    if len(comps) < need:
        raise GuardFailure(COMPONENTS["heldout_labels"],
                           f"the label store holds {len(comps)} held-out (split 'valid') comparisons; the preflight "
                           f"needs at least {need} to test the direction at confidence {gcfg.confidence} "
                           "(raise labels.num_comparisons or labels.valid_fraction)")

    # the ten checks below (check_labels gives two)
    progress = StageProgress("guards: preflight", 10, log=log, unit="checks", every_s=0.0)

    def timed(fn, *a):
        t0 = time.time()
        out = fn(*a)
        c = out[0] if isinstance(out, tuple) else out
        c.seconds = time.time() - t0
        progress.advance(1, f"{c.name} {'passed' if c.passed else 'FAILED'} in {c.seconds:.0f}s")
        if isinstance(out, tuple) and isinstance(out[1], Check):  # check_labels gives two checks
            progress.advance(1, f"{out[1].name} {'passed' if out[1].passed else 'FAILED'}")
        return out

    checks.append(timed(check_label_store, store))
    checks.append(timed(check_ppo_loss, trainer, alpha, seed))
    # each reward term on its own examples before the labels: an inverted term also loses the labelers' ranking
    # along the path, and the failure should name the term, not the stage where its effect shows
    checks.append(timed(check_reward_terms, trainer))
    vc, path, _ = timed(check_labels, trainer, comps, alpha)
    checks += [vc, path]
    checks.append(timed(check_coherence_coach, trainer, probe_queries, alpha, seed + 1, gcfg.require_coherence_coach))
    checks.append(timed(check_rollout, trainer, probe_queries, gcfg))
    checks.append(timed(check_padding, trainer, probe_queries, seed + 2))
    checks.append(timed(check_optimiser, trainer, probe_queries, alpha))
    can, can_fig = timed(check_canaries, trainer, canaries, alpha)
    checks.append(can)
    report = {"checks": [c.as_dict() for c in checks], "canaries": can_fig, "confidence": gcfg.confidence,
              "heldout": len(comps), "passed": all(c.passed for c in checks)}
    if log:
        for c in checks:
            mark = "[green]pass[/]" if c.passed and not c.warning else ("[yellow]warn[/]" if c.passed else "[red]FAIL[/]")
            log(f"  preflight {mark} {c.name}: {c.message}")
    failed = [c for c in checks if not c.passed]
    if failed:
        raise GuardFailure(failed[0].component, failed[0].message, report["checks"])
    return report
