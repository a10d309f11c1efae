"""RunControl, the one home for "stop": both Andon channels, the compare-and-set status, the halt record."""

from __future__ import annotations

import json

from megacoach.labels.store import LabelStore
from megacoach.runs import RunControl, RunDir


def _control(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    store = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    return RunControl(run, store, "run"), run, store


def test_a_pull_arrives_through_either_channel(tmp_path):
    ctl, run, store = _control(tmp_path)
    ctl.started(0)
    assert ctl.pulled() is None
    run.pull_andon("samples turned dark", "ana")  # `megacoach andon RUN_DIR`
    assert ctl.pulled()["who"] == "ana"
    run.andon_path.unlink()
    assert ctl.pulled() is None
    store.set_run_status("run", "paused", 3, {"reason": "rude output", "who": "bo"})  # the labeling app
    assert ctl.pulled() == {"reason": "rude output", "who": "bo"}


def test_a_pause_is_never_overwritten_by_the_running_status(tmp_path):
    ctl, run, store = _control(tmp_path)
    ctl.started(0)
    assert ctl.running(1, {"alarms": []}) is None
    assert store.get_run_status("run").status == "running"
    store.set_run_status("run", "paused", 1, {"reason": "stop now", "who": "cy"})
    pull = ctl.running(2, {"alarms": []})  # compare-and-set: the pause stays, and is reported
    assert pull == {"reason": "stop now", "who": "cy"}
    assert store.get_run_status("run").status == "paused"


def test_a_halt_is_recorded_in_the_run_folder_and_the_store(tmp_path):
    ctl, run, store = _control(tmp_path)
    ctl.started(0)
    ctl.halted({"reason": "guard kl_budget: spent", "source": "guard/kl_budget", "iteration": 4, "evidence": {}})
    assert json.loads(run.halted_path.read_text())["source"] == "guard/kl_budget"
    assert run.status()["status"] == "halted" and run.status()["iteration"] == 4
    rec = store.get_run_status("run")
    assert rec.status == "halted" and rec.detail["source"] == "guard/kl_budget"
    ctl.finished(5)
    assert run.status()["status"] == "finished"
