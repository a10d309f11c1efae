"""The guards object the PPO loop talks to: preflight, a check of every batch before it is optimised,
live monitors after every iteration, and their state in checkpoints.

    guards.preflight(reason)          before the first update, on resume, after a Values Coach (re)load
    guards.values_coach_reloaded(vc)  the online loop's hook: swap the Values Coach, rescore, preflight again
    guards.before_update(batch)       inside the iteration, before PPO's update: raises GuardHalt
    guards.before_first_step(figures) inside PPO's update, before its first optimiser step (PPOTrainer.before_first_step):
                                      the sampler against the trainer; raises GuardHalt
    guards.after_iteration(batch, metrics, labeler_scores) -> (guard/* metrics, alarms)

Fresh labels: every iteration `fresh_labels_per_iteration` items of K samples — ceil(K/2) from the
current Apprentice, the rest from the initial policy (the frozen reference model), same query — go into
the label store like any other items (source 'online', batch '<run>/guard-<iteration>', split 'valid' so
the Values Coach never trains on them). A program labeler labels them at once through `label_items`;
people's labels are picked up whenever they arrive. Each label gives two verdicts: did the labelers pick
a current sample (win rate against the initial policy), and does the Values Coach rank their choice first
(agreement).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from rich.console import Console

from megacoach import seeds
from megacoach.guards.alarms import Alarm, GuardFailure, GuardHalt
from megacoach.guards.canaries import load_canaries
from megacoach.guards.monitors import MONITORS, Thresholds, judge
from megacoach.guards.preflight import canary_margins, run_preflight
from megacoach.guards.rollout import halt_on_disagreement
from megacoach.guards.terms import term_metrics
from megacoach.guards.stats import alpha_per_check, ols, z_for
from megacoach.labels.labelers import label_items, labeler_scores
from megacoach.labels.records import NewSample
from megacoach.ppo import episodes, objective
from megacoach.reward import terms as reward_terms
from megacoach.sampling import HFGenerator
from megacoach.tasks import Query


def _default_log(msg: str) -> None:
    Console().print(msg)


class Guards:
    def __init__(self, cfg, trainer, store, labeler, run_dir: str | Path | None = None, run_id: str | None = None,
                 log=None):
        self.cfg, self.g, self.trainer, self.store, self.labeler = cfg, cfg.guards, trainer, store, labeler
        self.run_dir = Path(run_dir if run_dir is not None else cfg.run.out)
        self.run_id = run_id or self.run_dir.resolve().name
        self.log = log or _default_log
        self.alpha = alpha_per_check(self.g.confidence, trainer.n_iterations * len(MONITORS))
        self.z_halt = z_for(self.alpha)
        self.th = Thresholds(self.alpha, self.z_halt, self.g.divergence_window, self.g.min_evidence, self.g.kl_budget,
                             self.g.agreement_floor, self.g.winrate_floor)
        self.canaries = load_canaries(self.g.canaries, trainer.tok, cfg.task, labeler, self.log)
        self.ref_generator = HFGenerator(trainer.ref_lm, trainer.pad_id)
        self.gen = seeds.generator(cfg.run.seed, seeds.Stream.GUARD_SAMPLING, device=trainer.device)  # it samples
        self.rng = seeds.rng(cfg.run.seed, seeds.Stream.GUARD_CHOICES)
        self.history: list[dict] = []
        self.fresh: list[dict] = []
        self.pending: dict[int, dict] = {}
        self.baseline: dict | None = None
        self.preflights: list[dict] = []
        self.seen_id = 0
        self._before: dict = {}
        self._coach = None  # the Values Coach the baseline was scored with

    # ---------------------------------------------------------------------------------------- helpers
    def _sample(self, generator, queries, k: int) -> episodes.Sampled:
        """k samples per query (rows query-major), built as every episode is (ppo/episodes.py)."""
        tr = self.trainer
        rep = [q for q in queries for _ in range(k)]
        return episodes.sample(generator, tr.tok, self.cfg.task, tr.stops, rep, self.gen, 64)

    def _episode_scores(self, query_ids, truncated, valid) -> np.ndarray:
        """The episode scores PPO would see: the Values Coach's score, or the task's penalty where invalid."""
        if query_ids.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        return episodes.episode_scores(self.trainer, query_ids, truncated, valid).float().cpu().numpy()

    def _labeler_scores(self, queries, texts) -> np.ndarray:
        return labeler_scores(self.labeler, [q.text for q in queries], texts)

    def _write_preflight(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "guards_preflight.json").write_text(json.dumps(self.preflights, indent=2, default=str))
        except OSError:
            pass

    # ---------------------------------------------------------------------------------------- preflight
    def preflight(self, reason: str = "before the first update") -> dict | None:
        """Run the preflight checks (GuardFailure on failure) and make sure the initial-policy baseline exists."""
        t0 = time.time()
        report = None
        if self._coach is not None and self.trainer.values_coach is not self._coach:
            self._values_coach_changed()
        self._coach = self.trainer.values_coach
        if self.g.preflight:
            self.log(f"[bold]guards[/]: preflight {reason} (confidence {self.g.confidence})")
            qs = self.rng.sample(self.trainer.train_queries, min(self.g.probe_queries, len(self.trainer.train_queries)))
            entry = {"reason": reason, "iteration": self.trainer.iteration_no, "time": time.time()}
            try:
                report = run_preflight(self.trainer, self.store, self.canaries, self.g,
                                       seeds.seed_of(self.cfg.run.seed, seeds.Stream.PREFLIGHT), qs, self.log)
            except GuardFailure as err:
                self.preflights.append({**entry, "passed": False, "component": err.component, "message": str(err),
                                        "checks": err.checks})
                self._write_preflight()
                raise
            self.preflights.append({**entry, **report, "seconds": time.time() - t0})
            self._write_preflight()
        else:
            self.log("[yellow]guards[/]: preflight is switched off (guards.preflight=false): only the live "
                     "monitors watch this run")
        if self.baseline is None:
            self._build_baseline()
        self.log(f"[bold]guards[/]: ready ({time.time() - t0:.0f}s); live monitors halt at one-sided "
                 f"alpha {self.alpha:.1e} per check (z {self.z_halt:.2f})")
        return report

    def _build_baseline(self) -> None:
        """Samples of the initial policy (the frozen reference model) on training queries: what the live
        monitors compare the current Apprentice with."""
        n = self.g.baseline_samples
        qs = [self.trainer.train_queries[self.rng.randrange(len(self.trainer.train_queries))] for _ in range(n)]
        t0 = time.time()
        self.log(f"guards: sampling {n} continuations of the initial policy (the live monitors' baseline)")
        s = self._sample(self.ref_generator, qs, 1)
        self.log(f"guards: baseline sampled ({time.time() - t0:.0f}s)")
        self.baseline = {
            "query_ids": s.query_ids, "truncated": s.truncated, "valid": s.valid,
            "score": self._episode_scores(s.query_ids, s.truncated, s.valid),
            "labeler": self._labeler_scores(s.queries, s.texts),
            "ref_nll": float(-objective.masked_mean(s.logprobs, s.mask)) if s.mask is not None else float(-s.logprobs.mean()),
            "texts": s.texts[:8],
        }

    def values_coach_reloaded(self, values_coach=None, reason: str = "after the Values Coach was (re)loaded") -> dict | None:
        """Call after every Values Coach (re)load: swaps it in (if given), rescores what the monitors compare
        against, and runs the preflight again (GuardFailure if the new coach points the wrong way)."""
        if values_coach is not None:
            self.trainer.values_coach = values_coach
        return self.preflight(reason)  # notices the new coach: rescores, then checks it

    def _values_coach_changed(self) -> None:
        """Another Values Coach: rescore the initial-policy baseline; older scores are not comparable any more."""
        if self.baseline is not None:
            b = self.baseline
            b["score"] = self._episode_scores(b["query_ids"], b["truncated"], b["valid"])
        for h in self.history:
            h["score"] = None
        for item in self.pending.values():
            item["values"] = None
        for f in self.fresh:  # the win rate stays; the agreement counts the new coach's rankings only
            f["values"] = None

    # ---------------------------------------------------------------------------------------- before the update
    def before_update(self, batch) -> None:
        """The batch PPO is about to optimise: finite everywhere, scored by the Values Coach as the rollout
        says, and pushed up by the actual loss where the Values Coach's score is high and the KL low."""
        tr = self.trainer
        path = batch.path
        if not self.g.batch_check:
            self._before = {}
            return
        for name, t in (("Values Coach scores", batch.raw_scores), ("log-probs", batch.logprobs),
                        ("reference log-probs", batch.ref_logprobs), ("values", batch.values),
                        ("rewards", path.rewards), ("advantages", path.advantages), ("returns", path.returns)):
            if not torch.isfinite(t).all():
                raise GuardHalt(Alarm("nonfinite", "halt", f"non-finite {name} in the batch of iteration "
                                      f"{tr.iteration_no + 1}, before the update"))
        coach_score = self._episode_scores(batch.query_ids, batch.truncated, batch.valid)  # the Values Coach, again
        score = coach_score
        if batch.terms is not None and tr.terms:  # with the reward terms, as the rollout's texts score them
            vt = episodes.term_values(tr, batch.queries, batch.texts)
            score = score + np.where(batch.valid.cpu().numpy(), objective.term_total(
                vt, reward_terms.weights_of(tr.terms, vt.device)).float().cpu().numpy(), 0.0).astype(np.float32)
        raw_now = torch.as_tensor(score, device="cpu")
        raw_batch = batch.path.scores.float().cpu()  # what the rollout carried into the reward path
        gap = float((raw_now - raw_batch).abs().max()) if len(score) else 0.0
        tol = 1e-3 * (1.0 + float(raw_now.abs().max()) if len(score) else 1.0)
        k1 = objective.sequence_kl(batch.logprobs.float(), batch.ref_logprobs.float(), batch.mask).cpu().numpy()
        p = tr.cfg.ppo
        push = objective.loss_push(batch.logprobs, path.advantages, batch.values, path.returns, p.cliprange,
                                   p.cliprange_value, p.vf_coef, batch.mask).cpu().numpy()
        fit = ols(push, score, k1)
        m = {"guard/score_gap": gap}
        figs = {"score_gap": gap}
        if fit is not None:
            m.update({"guard/push_score_t": float(fit.t[1]), "guard/push_kl_t": float(fit.t[2])})
            figs.update({"push_score_t": float(fit.t[1]), "push_kl_t": float(fit.t[2]), "df": fit.df,
                         "alpha": self.alpha})
        self._before = {"iteration": tr.iteration_no + 1, "score": coach_score, "metrics": m, "push": push}
        if gap > tol:
            raise GuardHalt(Alarm("path_direction", "halt", f"the batch's scores differ from the Values Coach's by up "
                                  f"to {gap:.3g}: the rollout does not carry the Values Coach's verdict", figs))
        if fit is not None:
            bad_score = fit.p_negative(1) <= self.alpha
            bad_kl = fit.p_positive(2) <= self.alpha and float(tr.kl_ctl.value) > 0
            if bad_score or bad_kl:
                order = np.argsort(-push)
                samples = [{"response": batch.texts[i], "values_coach": float(score[i]), "kl": float(k1[i]),
                            "push": float(push[i])} for i in order[:4]]
                what = []
                if bad_score:
                    what.append(f"DOWN on responses the Values Coach scores higher (t = {fit.t[1]:.1f})")
                if bad_kl:
                    what.append(f"UP on responses further from the original model (KL rewarded, t = {fit.t[2]:.1f})")
                raise GuardHalt(Alarm("path_direction", "halt", "PPO is about to push " + " and ".join(what) +
                                      " — the reward path is flipped somewhere between the Values Coach and the "
                                      "optimiser", figs, samples))

    # ---------------------------------------------------------------------------------------- before the first step
    def before_first_step(self, figures: dict) -> None:
        """PPOTrainer.update's hook, before its first optimiser step: the trainer's log-probs of the first
        minibatch's tokens against the rollout's own (guards/rollout.py); raises GuardHalt beyond float rounding."""
        if self.g.rollout_check:
            halt_on_disagreement(figures, self.trainer, self.g.rollout_tolerance)

    # ---------------------------------------------------------------------------------------- after the iteration
    def _fresh_items(self, batch, iteration: int) -> None:
        m = self.g.fresh_labels_per_iteration
        if m <= 0:
            return
        k = self.cfg.labels.k
        c = (k + 1) // 2
        queries = list(batch.queries[:m])
        cur = self._sample(self.trainer.generator, queries, c)
        ini = self._sample(self.ref_generator, queries, k - c)

        specs, metas = [], []
        for j, q in enumerate(queries):
            rows = [("current", cur, j * c + i) for i in range(c)] + [("initial", ini, j * (k - c) + i) for i in range(k - c)]
            order = list(range(k))
            self.rng.shuffle(order)  # canonical order mixed, so position says nothing about the source
            rows = [rows[i] for i in order]
            samples = [NewSample(src.texts[r], src.ids[r],
                                 policy=f"apprentice@{iteration}" if kind == "current" else "initial",
                                 iteration=iteration if kind == "current" else 0, seed=self.cfg.run.seed,
                                 run_id=self.run_id) for kind, src, r in rows]
            specs.append(dict(query_text=q.text, query_token_ids=q.token_ids, samples=samples, split="valid",
                              batch=f"{self.run_id}/guard-{iteration}", source="online", run_id=self.run_id))
            q_ids = torch.cat([src.query_ids[r:r + 1] for _, src, r in rows])
            tr_ids = torch.cat([src.truncated[r:r + 1] for _, src, r in rows])
            valid = torch.cat([src.valid[r:r + 1] for _, src, r in rows])
            metas.append({"iteration": iteration, "current": [i for i, (kind, _, _) in enumerate(rows) if kind == "current"],
                          "p0": c / k, "values": self._episode_scores(q_ids, tr_ids, valid).tolist()})
        contents = self.store.create_items(specs)
        for content, meta in zip(contents, metas):
            self.pending[content.item.id] = meta
        if getattr(self.labeler, "kind", "program") == "program":
            label_items(self.store, self.labeler, contents, rng=self.rng, guideline_version=self.cfg.labels.guideline_version)

    def _collect_labels(self) -> None:
        if not self.pending:
            return
        for comp in self.store.comparisons(split="valid", after_id=self.seen_id):
            self.seen_id = max(self.seen_id, comp.id)
            meta = self.pending.pop(comp.item_id, None)
            if meta is None:
                continue
            values = meta["values"]
            if values is None:  # the Values Coach was reloaded since: score the samples again
                t, tr = self.cfg.task, self.trainer
                q_ids = episodes.pad_queries([Query(comp.query_text, comp.query_token_ids)] * comp.k, tr.pad_id,
                                             t.query_length, device=tr.device)
                resp = episodes.pad_responses([s.token_ids for s in comp.samples], tr.pad_id, t.response_length,
                                              device=tr.device)
                truncated, valid = episodes.settle(resp, tr.stops, tr.pad_id)
                values = self._episode_scores(q_ids, truncated, valid).tolist()
            self.fresh.append({"iteration": meta["iteration"], "values": values, "chosen": comp.chosen,
                               "win": comp.chosen in meta["current"], "p0": meta["p0"]})

    def after_iteration(self, batch, metrics: dict, labeler_scores) -> tuple[dict, list[Alarm]]:
        tr = self.trainer
        it = tr.iteration_no
        alarms: list[Alarm] = []
        before = self._before if self._before.get("iteration") == it else {}
        gm = dict(before.get("metrics", {}))
        # non-finite values anywhere
        bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)
               and not k.startswith("labeler/")]
        bad_params = [n for n, p in tr.apprentice.named_parameters() if not torch.isfinite(p).all()]
        if bad or bad_params:
            alarms.append(Alarm("nonfinite", "halt", "non-finite values: " + ", ".join((bad + bad_params)[:6]),
                                {"metrics": bad, "parameters": bad_params[:20]}))
        # the update itself: did it move each response's log-probability the way the loss pushed it?
        push = before.get("push")
        if push is not None and len(push) > 3:
            new_logp = episodes.forward_old(tr, batch.query_responses)[0].float()
            moved = episodes.real(new_logp - batch.logprobs.float(), batch.mask).sum(1).cpu().numpy()
            fit = ols(moved, push)
            if fit is not None:
                gm["guard/update_push_t"] = float(fit.t[1])
                if fit.p_negative(1) <= self.alpha:
                    alarms.append(Alarm("update_direction", "halt", "the PPO update moved log-probabilities AGAINST "
                                        f"the direction the loss pushed them (t = {fit.t[1]:.1f}): the optimiser step "
                                        "goes uphill", {"t": float(fit.t[1]), "df": fit.df, "alpha": self.alpha}))
        score = before.get("score")
        if score is None:
            score = self._episode_scores(batch.query_ids, batch.truncated, batch.valid)
        ls = np.asarray(labeler_scores, dtype=float)
        kl = float(objective.sequence_kl(batch.logprobs.float(), batch.ref_logprobs.float(), batch.mask).mean())
        ref_nll = float(-(batch.ref_logprobs.float().mean() if batch.mask is None
                          else objective.masked_mean(batch.ref_logprobs.float(), batch.mask)))
        self.history.append({"iteration": it, "score": np.asarray(score, dtype=float), "labeler": ls,
                             "score_mean": float(np.mean(score)), "labeler_mean": float(np.nanmean(ls)) if np.isfinite(ls).any() else float("nan"),
                             "kl": kl})
        keep = 2 * self.g.divergence_window + 2
        for h in self.history[:-keep]:
            h["score"], h["labeler"] = None, None
        self._fresh_items(batch, it)
        self._collect_labels()
        canary = canary_margins(tr, self.canaries) if self.canaries else None
        m, al = judge(self.history, self.fresh, self.baseline or {}, canary, self.th, kl)
        gm.update(m)
        gm["guard/ref_nll"] = ref_nll
        if self.baseline is not None:
            gm["guard/ref_nll_initial"] = self.baseline["ref_nll"]
        alarms += al
        tm = term_metrics(tr, batch, ls)  # each reward term against the labelers (a warning, never a halt)
        gm.update(tm)
        for t in tr.terms:
            z = tm.get(f"guard/term/{t.name}_labeler_z")
            if z is not None and z <= -3.0:
                alarms.append(Alarm("reward_terms", "warn", f"reward term {t.name!r} falls where the labelers' score "
                                    f"rises (r = {tm[f'guard/term/{t.name}_labeler_r']:+.2f}, z = {z:.1f})",
                                    {"term": t.name, "r": tm[f"guard/term/{t.name}_labeler_r"], "z": z}))
        if alarms:
            worst = np.argsort(ls if np.isfinite(ls).any() else score)[:4]
            rows = [{"query": batch.queries[i].text[-120:], "response": batch.texts[i],
                     "labeler": float(ls[i]) if np.isfinite(ls[i]) else None, "values_coach": float(score[i])}
                    for i in worst]
            for a in alarms:
                if a.action != "warn" and not a.samples:
                    a.samples = rows
        return gm, alarms

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"history": self.history, "fresh": self.fresh, "pending": self.pending, "baseline": self.baseline,
                "preflights": self.preflights, "seen_id": self.seen_id, "gen": self.gen.get_state(),
                "gen_device": torch.device(self.gen.device).type, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.history = state.get("history", [])
        self.fresh = state.get("fresh", [])
        self.pending = state.get("pending", {})
        self.baseline = state.get("baseline")
        self.preflights = state.get("preflights", [])
        self.seen_id = state.get("seen_id", 0)
        if "gen" in state:  # saved on another kind of device (a GPU run resumed on the CPU): its own stream
            seeds.restore(self.gen, state["gen"], state.get("gen_device"))
        if "rng" in state:
            self.rng.setstate(state["rng"])

