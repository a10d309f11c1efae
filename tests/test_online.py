"""Online labeling: current-policy items reach the store with provenance, labels arrive, the Values Coach is
retrained and swapped in (batched mode: deterministic with a mock labeler)."""

from __future__ import annotations

import json

from megacoach.config import load_config
from megacoach.labels.store import LabelStore
from megacoach.pipeline import train


def test_batched_online_loop_retrains_values_coach(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(preset="tiny", overrides=[{
        "model": {"name_or_path": str(tiny_model_dir)}, "run": {"out": str(out)}, "ppo": {"total_episodes": 48},
        "online": {"enabled": True, "mode": "batched", "collect_every": 2, "items_per_batch": 6,
                   "retrain_every_labels": 8}}])
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    retrains = [r["online/retrains"] for r in rows if "online/retrains" in r]
    assert retrains and retrains == sorted(retrains)
    assert (out / "values_coach_r01" / "reward_config.json").is_file()
    store = LabelStore(f"sqlite:///{out / 'labels.db'}")
    online = [c for c in store.comparisons() if c.item_source == "online"]
    assert len(online) == 6 * 3  # iterations 2, 4, 6
    assert {s.iteration for c in online for s in c.samples} == {2, 4, 6}
    assert all(s.policy.endswith(f"@{s.iteration}") for c in online for s in c.samples)


def test_online_with_people_only_waits_and_times_out_cleanly(tiny_model_dir, tmp_path):
    """No mock labeler and nobody labeling: batched mode stops with a clear message and a checkpoint."""
    import pytest

    from megacoach.errors import HaltError

    out = tmp_path / "run"
    cfg = load_config(preset="tiny", overrides=[{
        "model": {"name_or_path": str(tiny_model_dir)}, "run": {"out": str(out)}, "ppo": {"total_episodes": 16},
        "online": {"enabled": True, "mode": "batched", "collect_every": 1, "items_per_batch": 2,
                   "mock_labeler": None, "wait_timeout_s": 0.5}}])
    with pytest.raises(HaltError, match="not labeled within"):
        train(cfg)
    assert (out / "HALTED.json").is_file() or (out / "checkpoints").is_dir()


def test_people_only_run_waits_for_the_app_and_trains_on_their_labels(tiny_model_dir, tmp_path):
    """labels.labeler=people: items wait in the store; a 'person' (here a thread writing through the store API,
    as the app does) labels them; training proceeds on those labels, with no mock score logged."""
    import threading
    import time

    out = tmp_path / "run"
    cfg = load_config(preset="tiny", overrides=[{
        "model": {"name_or_path": str(tiny_model_dir)}, "run": {"out": str(out)}, "ppo": {"total_episodes": 16},
        "labels": {"labeler": "people", "num_comparisons": 6}, "guards": {"enabled": False},
        "online": {"min_initial_labels": 6, "wait_timeout_s": 120}}])
    done = threading.Event()

    def person():
        store = None
        while not done.is_set():
            if (out / "labels.db").is_file():
                store = store or LabelStore(f"sqlite:///{out / 'labels.db'}")
                alice = store.get_or_create_labeler("alice", kind="person", role="labeler")
                for item in store.items_without_labels(labeler=alice.id):
                    store.add_comparison(item.id, chosen=0, labeler=alice, time_taken_s=3.0)
            time.sleep(0.2)

    t = threading.Thread(target=person, daemon=True)
    t.start()
    try:
        train(cfg)
    finally:
        done.set()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("labeler/score" not in r for r in rows)
    store = LabelStore(f"sqlite:///{out / 'labels.db'}")
    assert {c.labeler_kind for c in store.comparisons()} == {"person"}
    assert (out / "report.html").is_file()
