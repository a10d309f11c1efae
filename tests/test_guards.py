"""Guards against the section 4.4 incident, on the tiny model.

A random tiny model learns nothing in two iterations, so the tests construct situations where the right
direction is known: the human evaluators are `CoachLabeler`, who share the tiny Values Coach's taste; every
bug kind must then be refused (preflight) or halted (monitors), and clean runs must go through.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console

import guard_helpers as H
from megacoach.cli import main
from megacoach.config import load_config
from megacoach.errors import ConfigError, HaltError
from megacoach.guards import GuardFailure
from megacoach.guards import bugs as B
from megacoach.guards import monitors as M
from megacoach.guards import stats as S
from megacoach.pipeline import train

QUIET = Console(quiet=True)


# ------------------------------------------------------------------------------------------ statistics
def test_rank_test_is_exact_against_enumeration():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ks = list(rng.integers(2, 5, size=3))
        values = [rng.integers(0, 3, size=k).astype(float) for k in ks]  # many ties
        chosen = [int(rng.integers(k)) for k in ks]
        r = S.rank_test(values, chosen)
        score = lambda row, c: 2 * np.sum(row[c] > np.delete(row, c)) + np.sum(row[c] == np.delete(row, c))  # noqa
        obs = sum(score(v, c) for v, c in zip(values, chosen))
        null = [sum(score(v, c) for v, c in zip(values, cs)) for cs in itertools.product(*[range(k) for k in ks])]
        n = len(null)
        assert math.isclose(r.p_better, sum(x >= obs for x in null) / n, abs_tol=1e-12)
        assert math.isclose(r.p_worse, sum(x <= obs for x in null) / n, abs_tol=1e-12)


def test_rank_test_directions_and_ties():
    good = S.rank_test([[1, 0, 0, 0]] * 6, [0] * 6)
    assert good.agreement == 1 and good.top1 == 1 and good.p_better == pytest.approx(4 ** -6)
    bad = S.rank_test([[3, 2, 1, 0]] * 6, [3] * 6)
    assert bad.p_worse == pytest.approx(4 ** -6) and bad.p_better == 1 and bad.agreement == 0
    ties = S.rank_test([[-1, -1, -1, -1]] * 50, [0] * 50)  # e.g. every response invalid: no evidence
    assert ties.agreement == 0.5 and ties.p_better == 1 and ties.p_worse == 1


def test_tails_and_tests():
    assert S.binom_sf(13, 16, 0.5) == pytest.approx(0.0106, abs=1e-4)
    assert S.binom_cdf(3, 16, 0.5) == pytest.approx(0.0106, abs=1e-4)
    assert S.z_for(0.01) == pytest.approx(2.3263, abs=1e-3)
    assert S.z_for(1e-20) == pytest.approx(9.262, abs=0.01)
    assert S.t_sf(2.0, 10) == pytest.approx(0.03669, abs=1e-4)
    assert S.t_sf(-2.0, 10) == pytest.approx(1 - 0.03669, abs=1e-4)
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=200), rng.normal(size=200)
    fit = S.ols(2 * x1 - 0.5 * x2 + rng.normal(size=200), x1, x2)
    assert fit.p_positive(1) < 1e-6 and fit.p_negative(2) < 1e-3
    fit = S.ols(x1.copy(), x1, np.zeros(200))  # a predictor without spread is dropped, not fatal
    assert fit.t[2] == 0 and fit.coef[1] == pytest.approx(1)
    assert S.alpha_per_check(0.99, 100) == pytest.approx(1e-4)


# ------------------------------------------------------------------------------------------ monitors (synthetic)
TH = M.Thresholds(alpha=1e-4, z_halt=S.z_for(1e-4), window=4, min_evidence=24, kl_budget=25.0, agreement_floor=0.5,
                  winrate_floor=None)


def _stream(n_iter, score_shift=0.0, labeler_shift=0.0, seed=0, per=64):
    rng = np.random.default_rng(seed)
    return [{"iteration": i + 1, "score": rng.normal(score_shift * (i + 1) / n_iter, 1, per),
             "labeler": rng.normal(labeler_shift * (i + 1) / n_iter, 0.4, per)} for i in range(n_iter)]


def _halts(history, fresh=(), canary=None, kl=1.0):
    rng = np.random.default_rng(9)
    base = {"score": rng.normal(0, 1, 256), "labeler": rng.normal(0, 0.4, 256)}
    out = set()
    for i in range(1, len(history) + 1):
        _, alarms = M.judge(history[:i], [f for f in fresh if f["iteration"] <= i], base, canary, TH, kl)
        out |= {a.name for a in alarms if a.action == "halt"}
    return out


def test_monitors_stay_quiet_on_clean_streams():
    for seed in range(20):
        fresh = [{"iteration": i // 8 + 1, "values": list(np.random.default_rng(seed * 1000 + i).normal(size=4)),
                  "chosen": int(np.random.default_rng(i).integers(4)),
                  "win": bool(np.random.default_rng(i + 7).random() < 0.5), "p0": 0.5} for i in range(30 * 8)]
        # a clean run: the Values Coach's score rises, the labelers' score rises or stays put
        assert _halts(_stream(30, score_shift=1.5, labeler_shift=0.1, seed=seed), fresh) == set()


def test_monitors_halt_falling_scores_and_divergence():
    assert "score_drop" in _halts(_stream(12, score_shift=-1.0))
    assert "labeler_drop" in _halts(_stream(12, labeler_shift=-0.3))
    assert "divergence" in _halts(_stream(16, score_shift=3.0, labeler_shift=-0.4, per=256))


def test_monitors_halt_on_fresh_labels_canaries_and_kl():
    hist = _stream(6)
    lost = [{"iteration": i // 8 + 1, "values": [0.0, 1.0, 2.0, 3.0], "chosen": 0, "win": i % 6 == 0, "p0": 0.5}
            for i in range(48)]
    assert {"winrate", "agreement"} <= _halts(hist, lost)
    canary = {"n": 24, "correct": 1, "p_worse": S.binom_cdf(1, 24, 0.5), "worst": []}
    assert "canaries" in _halts(hist, canary=canary)
    assert "kl_budget" in _halts(hist, kl=40.0)
    assert _halts(hist, lost[:10]) == set()  # too little evidence yet: no halt


# ------------------------------------------------------------------------------------------ config and bugs
@pytest.mark.parametrize("bad", [{"confidence": 1.2}, {"confidence": 0.3}, {"kl_budget": -1}, {"kl_budget": 0},
                                 {"agreement_floor": 0}, {"winrate_floor": 1.5}, {"min_evidence": -2},
                                 {"divergence_window": 1}, {"probe_queries": 0}, {"baseline_samples": -5}])
def test_bad_guard_thresholds_are_config_errors(bad):
    with pytest.raises(ConfigError, match="guards"):
        load_config(overrides=[{"guards": bad}])


def test_bug_patches_are_undone():
    from megacoach.labels.store import LabelStore
    from megacoach.ppo import objective
    from megacoach.ppo.policy import Apprentice
    from megacoach.ppo.trainer import PPOTrainer
    from megacoach.reward import train as reward_train
    from megacoach.reward.model import RewardModel

    links = lambda: (objective.megacoach_rewards, objective.advantages_and_returns, objective.assemble_rewards,  # noqa
                     objective.policy_loss, objective.whiten_rewards, RewardModel.forward, reward_train.best_of_k_loss,
                     PPOTrainer.__init__, LabelStore._comparison_records, Apprentice.forward, objective.term_total)
    before = links()
    for name in B.BUGS:
        with B.inject(name) as bug:
            assert bug.name == name and links() != before
        assert links() == before
    with pytest.raises(ConfigError, match="unknown bug"):
        B.get("nope")


# ------------------------------------------------------------------------------------------ tiny runs
@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_model_dir):
    db, coach = H.prepare_tiny(tmp_path_factory.mktemp("guards"), tiny_model_dir)
    return tiny_model_dir, db, coach


def run_tiny(prepared, tmp_path, bug=None, guards=None, **sections):
    md, db, coach = prepared
    run = H.new_run(tmp_path, db)
    cfg = H.tiny_config(run, md, coach, guards=guards, **sections)
    with B.inject(bug):
        return train(cfg, console=QUIET), run


@pytest.fixture(scope="module")
def rig(prepared, tmp_path_factory):
    """A trainer, store and labeler as the pipeline builds them, for preflight-level tests."""
    return H.build_rig(prepared, tmp_path_factory.mktemp("rig"))


def _guards(rig):
    from megacoach.guards.core import Guards

    cfg, trainer, store, labeler = rig
    return Guards(cfg, trainer, store, labeler, log=QUIET.print)


EXPECTED = {  # bug -> the component the preflight names
    "incident": "Megacoach reward", "reward-flip": "Megacoach reward", "score-sign": "Megacoach reward",
    "reward-scaling-sign": "Megacoach reward", "no-coherence-coach": "Coherence Coach", "kl-sign": "Coherence Coach",
    "negated-gain": "Values Coach", "advantage-sign": "advantages", "loss-sign": "PPO loss",
    "choice-reversed": "label store", "temperature-one-place": "sampler and trainer", "pad-leak": "padding",
    "kl-zeroed": "Coherence Coach",
}


def test_clean_preflight_passes_and_restores_the_trainer(rig):
    cfg, trainer, _, _ = rig
    before = {k: v.clone() for k, v in trainer.apprentice.state_dict().items()}
    gens = {k: g.get_state().clone() for k, g in trainer.gens.items()}
    report = _guards(rig).preflight()
    assert report["passed"] and {c["name"] for c in report["checks"]} >= {
        "ppo_loss", "values_coach", "reward_path", "coherence_coach", "optimiser"}
    after = trainer.apprentice.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(gens[k], g.get_state()) for k, g in trainer.gens.items())
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.iteration_no == 0


@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_preflight_names_the_component_of_each_bug(rig, bug):
    with B.inject(bug), pytest.raises(GuardFailure) as err:
        _guards(rig).preflight()
    assert EXPECTED[bug] in err.value.component, str(err.value)
    assert "Nothing was trained" in str(err.value)


def test_preflight_after_a_values_coach_reload(rig):
    import copy

    cfg, trainer, _, _ = rig
    g = _guards(rig)
    g.preflight()
    original = trainer.values_coach
    flipped = copy.deepcopy(original)
    with torch.no_grad():
        flipped.head.weight.neg_()  # a coach that learned the labels backwards
    try:
        with pytest.raises(GuardFailure, match="Values Coach"):
            g.values_coach_reloaded(flipped)
        assert g.baseline["score"] is not None
    finally:
        trainer.values_coach = original


def test_too_few_heldout_labels_refuse(rig):
    cfg, trainer, store, labeler = rig
    from megacoach.guards.core import Guards

    tight = cfg.model_copy(update={"guards": cfg.guards.model_copy(update={"min_heldout": 10_000})})
    with pytest.raises(GuardFailure, match="held-out"):
        Guards(tight, trainer, store, labeler, log=QUIET.print).preflight()


def test_clean_runs_are_not_halted(prepared, tmp_path):
    for seed in (1, 2, 3):
        summary, run = run_tiny(prepared, tmp_path / str(seed), run={"seed": seed})
        assert summary["iterations"] == 2 and not (run / "HALTED.json").exists()
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(r["guard/alarms"] == 0 for r in rows)
        for key in ("guard/push_score_t", "guard/score_z", "guard/labeler_z", "guard/winrate", "guard/agreement",
                    "guard/kl", "guard/z_halt"):
            assert key in rows[-1], key
        pre = json.loads((run / "guards_preflight.json").read_text())
        assert pre[0]["passed"]


@pytest.mark.parametrize("bug,component", [("incident", "Megacoach reward"), ("optimizer-ascent", "optimiser")])
def test_pipeline_refuses_bugs_before_training(prepared, tmp_path, bug, component):
    with pytest.raises(GuardFailure, match=component):
        run_tiny(prepared, tmp_path, bug)
    run = tmp_path / H.RUN_NAME
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_inverted_labels_give_an_inverted_values_coach_that_is_refused(prepared, tmp_path):
    md, db, _ = prepared
    run = H.new_run(tmp_path, db)
    cfg = H.tiny_config(run, md, None, reward={"learning_rate": 1e-3, "epochs": 5, "batch_size": 8})
    with B.inject("inverted-labels"), pytest.raises(GuardFailure, match="Values Coach"):
        train(cfg, console=QUIET)


@pytest.mark.parametrize("bug", ["incident", "reward-flip", "advantage-sign"])
def test_without_preflight_the_batch_check_halts_before_the_first_update(prepared, tmp_path, bug):
    with pytest.raises(HaltError):
        run_tiny(prepared, tmp_path, bug, guards={"preflight": False})
    rec = json.loads((tmp_path / H.RUN_NAME / "HALTED.json").read_text())
    assert rec["source"] == "guard/path_direction" and rec["iteration"] == 0
    assert rec["evidence"]["before_update"] is True


def test_without_preflight_an_uphill_optimiser_is_halted_after_its_first_update(prepared, tmp_path):
    with pytest.raises(HaltError):
        run_tiny(prepared, tmp_path, "optimizer-ascent", guards={"preflight": False})
    rec = json.loads((tmp_path / H.RUN_NAME / "HALTED.json").read_text())
    assert rec["source"] == "guard/update_direction" and rec["iteration"] == 1


# ------------------------------------------------------------------------------------------ Andon
def test_andon_on_missing_or_finished_run_changes_nothing(prepared, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["andon", str(missing), "--reason", "bad outputs"]) == 2
    assert "no megacoach run" in capsys.readouterr().err and not missing.exists()
    _, run = run_tiny(prepared, tmp_path / "done")
    before = sorted(p.name for p in run.iterdir())
    status = (run / "STATUS.json").read_text()
    assert main(["andon", str(run), "--reason", "bad outputs"]) == 2
    assert "already finished" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before and (run / "STATUS.json").read_text() == status


def _pull_after_first_iteration(monkeypatch, pull):
    from megacoach.ppo.trainer import PPOTrainer

    orig = PPOTrainer.iteration

    def iteration(self, *a, **k):
        out = orig(self, *a, **k)
        if self.iteration_no == 1:
            pull(self)
        return out

    monkeypatch.setattr(PPOTrainer, "iteration", iteration)


def test_andon_during_a_run_stops_it_within_one_iteration(prepared, tmp_path, monkeypatch):
    run = tmp_path / H.RUN_NAME
    _pull_after_first_iteration(monkeypatch, lambda tr: main(["andon", str(run), "--reason", "it is writing curses",
                                                              "--who", "ada"]))
    with pytest.raises(HaltError, match="Andon"):
        run_tiny(prepared, tmp_path)
    rec = json.loads((run / "HALTED.json").read_text())
    assert rec["source"] == "andon" and rec["iteration"] == 1 and "curses" in rec["reason"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((run / "STATUS.json").read_text())["status"] == "halted"
    # the cause is gone: --resume runs the preflight again and finishes
    monkeypatch.undo()
    md, _, coach = prepared
    cfg = H.tiny_config(run, md, coach)
    summary = train(cfg, resume=True, console=QUIET)
    assert summary["iterations"] == 2
    pre = json.loads((run / "guards_preflight.json").read_text())
    assert [p["reason"] for p in pre][-1].startswith("on resume") and pre[-1]["passed"]


def test_pause_from_the_labeling_app_stops_the_run(prepared, tmp_path, monkeypatch):
    from megacoach.labels.store import LabelStore

    run = tmp_path / H.RUN_NAME

    def pause(tr):
        with LabelStore(f"sqlite:///{run / 'labels.db'}") as store:
            store.set_run_status(H.RUN_NAME, "paused", 1, {"reason": "three people pulled the cord", "who": "app"})

    _pull_after_first_iteration(monkeypatch, pause)
    with pytest.raises(HaltError, match="three people"):
        run_tiny(prepared, tmp_path)
    assert json.loads((run / "HALTED.json").read_text())["iteration"] == 1


def test_pause_landing_between_the_check_and_the_status_write_is_kept(prepared, tmp_path, monkeypatch):
    """The race: the app pauses the run right after the loop's last Andon check of an iteration, before the loop
    writes 'running'. The write is a compare-and-set, so the pause survives and stops the run."""
    from megacoach.labels.store import LabelStore
    from megacoach.runs import RunControl

    run = tmp_path / H.RUN_NAME
    orig, calls = RunControl.pulled, []

    def pulled(self):
        out = orig(self)
        calls.append(out)
        if len(calls) == 2:  # the loop's check after iteration 1 (the 1st was before it) has just passed
            assert out is None
            with LabelStore(f"sqlite:///{run / 'labels.db'}") as store:
                store.set_run_status(H.RUN_NAME, "paused", 1, {"reason": "paused in the gap", "who": "app"})
        return out

    monkeypatch.setattr(RunControl, "pulled", pulled)
    with pytest.raises(HaltError, match="paused in the gap"):
        run_tiny(prepared, tmp_path)
    assert json.loads((run / "HALTED.json").read_text())["iteration"] == 1


# ------------------------------------------------------------------------------------------ the incident command
def test_incident_command_lists_bugs_and_rejects_bad_input(capsys):
    assert main(["incident", "--list-bugs"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("incident", "reward-flip", "no-coherence-coach"))
    assert main(["incident", "--bug", "nope"]) == 2
    assert main(["incident", "--no-guards", "--monitors-only"]) == 2


def test_incident_command_runs_end_to_end(tiny_model_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--comparisons", "16", "--iterations", "1", "--cache",
              str(tmp_path / "cache"), "--set", "run.eval_queries=8", "--set", "guards.baseline_samples=16",
              "--set", "guards.probe_queries=4"]
    assert main(["incident", "--no-guards", "--out", str(tmp_path / "off"), *common]) == 0
    out = capsys.readouterr().out
    assert "ran 1 iterations without being stopped" in out
    rec = json.loads((tmp_path / "off" / "incident.json").read_text())
    assert rec["bug"] == "incident" and rec["iterations"] == 1 and not rec["halted"]
    # guards on: a random tiny Values Coach (and 16 labels) cannot pass the preflight: refused, nothing trained
    assert main(["incident", "--out", str(tmp_path / "on"), *common]) == 0
    assert "STOPPED" in capsys.readouterr().out
    rec = json.loads((tmp_path / "on" / "incident.json").read_text())
    assert rec["halted"] and rec["iterations_to_halt"] == 0 and rec["stopped_by"].startswith("preflight")


@pytest.mark.parametrize("mini,accum,rows,world,want_accum", [(16, 1, 64, 1, 4), (16, 2, 64, 1, 8), (16, 1, 64, 2, 2),
                                                             (16, 1, 40, 1, 1), (24, 1, 64, 1, 1)])
def test_optimiser_probe_config_is_one_step(mini, accum, rows, world, want_accum):
    """The optimiser probe cuts PPO's update to ONE optimiser step over all its rows: one epoch, one minibatch of all
    rows, micro-batches of the configured size where they divide (else one micro-batch per process)."""
    from megacoach.guards.preflight import one_step_config

    cfg = load_config(overrides=[{"ppo": {"batch_size": 4 * mini, "mini_batch_size": mini,
                                          "gradient_accumulation_steps": accum, "ppo_epochs": 4}}])
    p = one_step_config(cfg, rows, world).ppo
    assert (p.ppo_epochs, p.batch_size, p.mini_batch_size) == (1, rows, rows)
    assert p.gradient_accumulation_steps == want_accum
    assert cfg.ppo.ppo_epochs == 4 and cfg.ppo.mini_batch_size == mini  # the trainer's own config is untouched
