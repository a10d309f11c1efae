"""The PPO loop around the trainer: metrics, checkpoints, resume, the guards, halting and the Andon cord.

Every iteration (`PPOLoop.run`): honour an Andon pull (runs.RunControl: RUN_DIR/ANDON.json, or a pause set in
the label store by the labeling app); run one PPO iteration (the guards see the batch before the update); score
the samples with the labelers (`labeler/score`, the "true" measure of mock runs); let online labeling swap in a
retrained Values Coach; let the guards' monitors judge; write one line to metrics.jsonl; check for a pull again;
checkpoint every `run.checkpoint_every` iterations and at the end. A halt (guard or Andon) saves a checkpoint,
writes HALTED.json and the report, and raises HaltError.
"""

from __future__ import annotations

import json
import time

import numpy as np

from megacoach import seeds
from megacoach.errors import HaltError
from megacoach.guards.alarms import Alarm, GuardHalt
from megacoach.labels.labelers import labeler_scores
from megacoach.lm.adapters import save_own_adapter
from megacoach.progress import StageProgress
from megacoach.report import Loggers, write_before_after, write_report
from megacoach.runs import RunControl


def progress_figures(metrics: dict) -> str:
    return (f"score {metrics['objective/score']:+.2f}  KL {metrics['objective/kl']:.2f}  "
            f"β {metrics['objective/kl_coef']:.3f}  labelers {metrics.get('labeler/score', float('nan')):+.3f}  "
            f"{metrics['time/iteration_s']:.1f}s/it")


class PPOLoop:
    def __init__(self, cfg, run, trainer, store, labeler, sampler, run_id: str, console, guards=None, online=None):
        self.cfg, self.rundir, self.trainer, self.store = cfg, run, trainer, store
        self.labeler, self.sampler, self.run_id, self.console = labeler, sampler, run_id, console
        self.guards = guards
        self.online = online  # megacoach.online.OnlineLabeling when labels arrive during training
        self.control = RunControl(run, store, run_id)
        self.loggers = Loggers(run.path, cfg.run.wandb, cfg.model_dump(mode="json"))

    # ---------------------------------------------------------------- resume
    def restore(self) -> None:
        state = self.rundir.latest_checkpoint()
        if state is None:
            return
        self.trainer.load_state_dict(state["trainer"])
        if self.online is not None and state.get("online"):
            self.online.load_state_dict(state["online"])
        if self.guards is not None and "guards" in state:
            self.guards.load_state_dict(state["guards"])
        self.rundir.truncate_metrics(self.trainer.iteration_no)
        self.console.print(f"resumed from iteration {self.trainer.iteration_no} "
                           f"(label store position {state.get('store_position')})")

    def checkpoint(self) -> None:
        state = {"trainer": self.trainer.state_dict(), "store_position": self.store.position(),
                 "guards": self.guards.state_dict() if self.guards is not None else None,
                 "online": self.online.state_dict() if self.online is not None else None}
        self.rundir.save_checkpoint(state, self.trainer.iteration_no)

    # ---------------------------------------------------------------- stopping
    def halt(self, reason: str, evidence: dict, source: str) -> None:
        it = self.trainer.iteration_no
        self.checkpoint()
        record = {"reason": reason, "source": source, "iteration": it, "episodes": self.trainer.episodes,
                  "time": time.time(), "evidence": evidence}
        self.control.halted(record)
        write_report(self.rundir.path, self.rundir.read_metrics(), [], self.summary(), halted=record)
        self.loggers.close()
        raise HaltError(f"{reason} (iteration {it}); evidence in {self.rundir.halted_path}. "
                        f"Fix the cause, then `megacoach train --resume {self.rundir.path}`")

    def halt_if_pulled(self, pull: dict | None) -> None:
        if pull:
            self.halt(f"Andon cord pulled by {pull.get('who')}: {pull.get('reason')}", {"pull": pull}, "andon")

    def halt_on_alarms(self, alarms: list[Alarm], batch, metrics: dict) -> None:
        for a in alarms:
            if a.action == "warn":
                self.console.print(f"[yellow]guard warning[/] {a.name}: {a.message}")
        halts = [a for a in alarms if a.action in ("halt", "pause")]
        if halts:
            a = halts[0]
            self.halt(f"guard {a.name}: {a.message}", {"alarms": [x.as_dict() for x in halts],
                                                        "samples": self.sample_rows(batch, 8), "metrics": metrics},
                      f"guard/{a.name}")

    # ---------------------------------------------------------------- the steps of one iteration
    def iterate(self):
        """One PPO iteration; the guards' batch check runs inside it, before the update."""
        try:
            return self.trainer.iteration(before_update=self.guards.before_update if self.guards else None)
        except FloatingPointError as err:
            self.halt(f"non-finite values: {err}", {}, "guard/nonfinite")
        except GuardHalt as err:  # from guards.before_update: nothing of this batch was optimised
            self.halt(f"guard {err.alarm.name}: {err.alarm.message}",
                      {"alarms": [err.alarm.as_dict()], "before_update": True, **err.evidence},
                      f"guard/{err.alarm.name}")

    def labeler_scores(self, batch) -> np.ndarray:
        if self.labeler is None:  # people only: their verdict arrives as labels, not as a score per sample
            return np.array([], dtype=float)
        return labeler_scores(self.labeler, [q.text for q in batch.queries], batch.texts)

    def online_step(self) -> dict:
        """New items for the labelers; maybe a retrained Values Coach (checked by the preflight first)."""
        if self.online is None:
            return {}
        tr = self.trainer
        try:
            swap = self.online.step(tr.iteration_no)
        except HaltError as err:  # e.g. nobody labeled a batch in time: stop cleanly, resumable
            self.halt(str(err), {"pending_batches": self.online.pending_batches[-3:]}, "online")
        if swap is None:
            return {}
        tr.values_coach, online_metrics = swap
        if self.guards is not None:  # every (re)loaded Values Coach passes the preflight first
            self.guards.preflight(f"after Values Coach retrain #{online_metrics['online/retrains']}")
        return online_metrics

    def log(self, batch, metrics: dict) -> None:
        it = self.trainer.iteration_no
        self.rundir.append_metrics(metrics)
        self.loggers.log(metrics, it)
        if it % self.cfg.run.sample_table_every == 0 or it == 1:
            rows = self.sample_rows(batch)
            self.loggers.log_samples(rows, it)
            with (self.rundir.path / "samples.jsonl").open("a") as f:
                for r in rows:
                    f.write(json.dumps({"iteration": it, **r}) + "\n")

    def sample_rows(self, batch, n: int = 4) -> list[dict]:
        kl = batch.path.kl.sum(1)
        return [{"query": batch.queries[i].text, "response": batch.texts[i], "score": float(batch.path.scores[i]),
                 "kl": float(kl[i])} for i in range(min(n, len(batch.texts)))]

    def progress(self) -> StageProgress:
        """A live bar on a terminal; elsewhere (output piped to a file) one plain line per iteration."""
        tr = self.trainer
        return StageProgress("PPO", tr.n_iterations, console=self.console, unit="iterations", every_s=0.0,
                             completed=tr.iteration_no)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        tr = self.trainer
        self.control.started(tr.iteration_no)
        if self.guards is not None:  # before the first update, and again on resume (after a fix)
            self.guards.preflight("before the first update" if tr.iteration_no == 0 else
                                  f"on resume at iteration {tr.iteration_no}")  # GuardFailure names the component
        with self.progress() as progress:
            while tr.iteration_no < tr.n_iterations:
                self.halt_if_pulled(self.control.pulled())  # check
                batch, metrics = self.iterate()  # rollout -> guards' batch check -> update -> beta
                ls = self.labeler_scores(batch)  # the labelers
                if len(ls):
                    metrics.update({"labeler/score": float(ls.mean()), "labeler/score_std": float(ls.std())})
                metrics.update(self.online_step())  # online labeling
                alarms = []
                if self.guards is not None:  # the live monitors
                    guard_metrics, alarms = self.guards.after_iteration(batch, metrics, ls)
                    metrics.update(guard_metrics)
                self.log(batch, metrics)
                progress.advance(1, progress_figures(metrics))
                self.halt_if_pulled(self.control.pulled())  # a pause set during this iteration must not be lost
                self.halt_if_pulled(self.control.running(tr.iteration_no, {"alarms": [a.as_dict() for a in alarms]}))
                self.halt_on_alarms(alarms, batch, metrics)
                if tr.iteration_no % self.cfg.run.checkpoint_every == 0:
                    self.checkpoint()
        self.checkpoint()
        self.control.finished(tr.iteration_no)
        return self.summary()

    def summary(self) -> dict:
        m = self.rundir.read_metrics()
        if not m:
            return {"iterations": 0}
        first, last = m[0], m[-1]
        out = {"iterations": last["iteration"], "episodes": last["episodes"],
               "objective/score first→last": f"{first['objective/score']:+.3f} → {last['objective/score']:+.3f}",
               "objective/kl last": round(last["objective/kl"], 3),
               "objective/kl_coef last": round(last["objective/kl_coef"], 4)}
        if "labeler/score" in first and "labeler/score" in last:
            out["labeler/score first→last"] = f"{first['labeler/score']:+.3f} → {last['labeler/score']:+.3f}"
        return out

    # ---------------------------------------------------------------- the end
    def finish(self, eval_queries, coach_metrics) -> dict:
        initial = [json.loads(line) for line in (self.rundir.path / "initial_samples.jsonl").read_text().splitlines()]
        final = [g[0] for g in self.sampler.continuations(eval_queries, 1, seeds.generator(
            self.cfg.run.seed, seeds.Stream.EVAL_SAMPLING, device=self.sampler.device))]  # where the model samples
        rows = [{"query": q.text, "initial": ini["response"], "final": fin.text}
                for q, ini, fin in zip(eval_queries, initial, final)]
        extra = {}
        if self.labeler is not None:  # the mock labelers' verdict on the same held-out queries
            for r in rows:
                r["initial_labeler_score"] = float(labeler_scores(self.labeler, [r["query"]], [r["initial"]])[0])
                r["final_labeler_score"] = float(labeler_scores(self.labeler, [r["query"]], [r["final"]])[0])
            extra = {"held-out labeler score initial": round(float(np.mean([r["initial_labeler_score"] for r in rows])), 4),
                     "held-out labeler score final": round(float(np.mean([r["final_labeler_score"] for r in rows])), 4)}
        write_before_after(self.rundir.path / "before_after.jsonl", rows)
        if coach_metrics and coach_metrics.get("valid_accuracy") is not None:
            extra["Values Coach held-out accuracy"] = round(coach_metrics["valid_accuracy"], 4)
            if coach_metrics.get("valid_reversed_accuracy") is not None:
                extra["Values Coach held-out accuracy, every choice reversed"] = round(
                    coach_metrics["valid_reversed_accuracy"], 4)
        save_own_adapter(self.trainer.apprentice.lm, self.rundir.path / "apprentice")
        self.sampler.tok.save_pretrained(self.rundir.path / "apprentice")
        summary = {**self.summary(), **extra}
        (self.rundir.path / "summary.json").write_text(json.dumps(summary, indent=2))
        write_report(self.rundir.path, self.rundir.read_metrics(), rows, summary)
        self.loggers.close()
        return extra
