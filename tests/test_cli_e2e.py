"""End to end through the CLI on a tiny locally made model: sample, label, reward, train, resume, andon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megacoach.cli import main


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("pretrain", "sample", "train", "andon", "label", "reward", "config"):
        assert cmd in out


def test_sample_prints_k_continuations(tiny_model_dir, capsys):
    assert main(["sample", "--model", str(tiny_model_dir), "--preset", "tiny", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "query" in out and all(f"{i}." in out for i in range(1, 5))
    assert "valid" in out  # every continuation is marked valid or invalid


def test_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope")]) == 2
    assert main(["sample", "--set", "ppo.nope=1"]) == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task:\n  temperature: -1\n")
    assert main(["sample", "--config", str(cfg)]) == 2
    empty = tmp_path / "q.txt"
    empty.write_text("\n")
    assert main(["sample", "--model", str(tiny_model_dir), "--set", f"task.query_source={empty}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "task.temperature" in err and "ppo.nope" in err and "no queries" in err


def test_label_reward_and_export_commands(tiny_model_dir, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'l.db'}"
    m = str(tiny_model_dir)
    assert main(["label", "auto", "--model", m, "--preset", "tiny", "--db", db, "--n", "12"]) == 0
    assert main(["label", "export", str(tmp_path / "out.jsonl"), "--db", db]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 12
    db2 = f"sqlite:///{tmp_path / 'l2.db'}"
    assert main(["label", "import", str(tmp_path / "out.jsonl"), "--db", db2]) == 0
    assert main(["reward", "train", "--model", m, "--preset", "tiny", "--db", db2, "--out", str(tmp_path / "vc")]) == 0
    assert main(["reward", "eval", str(tmp_path / "vc"), "--db", db2, "--split", "train"]) == 0
    assert "accuracy" in capsys.readouterr().out


def _train_cmd(tiny_model_dir, out, *extra):
    return [sys.executable, "-m", "megacoach.cli_entry", "train", "--preset", "tiny", "--model", str(tiny_model_dir),
            "--out", str(out), "--no-guards", *extra]


def test_train_writes_report_and_before_after(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(out), "--no-guards"]) == 0
    for f in ("config.yaml", "versions.json", "metrics.jsonl", "report.html", "before_after.jsonl", "summary.json"):
        assert (out / f).is_file(), f
    rows = [json.loads(x) for x in (out / "before_after.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) >= {"query", "initial", "final"}
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("iteration", "episodes", "objective/score", "objective/kl", "objective/kl_coef", "objective/score_total",
                "objective/entropy", "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/val/var_explained",
                "time/iteration_s", "labeler/score"):
        assert key in m, key
    # the same folder again without --resume is refused, nothing lost
    assert main(["train", "--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    assert (out / "report.html").is_file()


def test_kill_and_resume_gives_identical_metrics(tiny_model_dir, tmp_path):
    episodes = ["--set", "ppo.total_episodes=240", "--set", "run.checkpoint_every=1"]
    full = tmp_path / "full"
    done = subprocess.run(_train_cmd(tiny_model_dir, full, *episodes), check=True, capture_output=True, text=True)
    # not a terminal (piped): one plain progress line per PPO iteration instead of a live bar
    lines = [x for x in done.stdout.splitlines() if x.startswith("PPO ")]
    assert [x.split()[1] for x in lines] == [f"{i}/30" for i in range(1, 31)], done.stdout[-2000:]
    assert "score" in lines[0] and "KL" in lines[0]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, cut, *episodes), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = cut / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if latest.is_file() and json.loads(latest.read_text())["iteration"] >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(latest.read_text())["iteration"]
    assert killed_at < 30, "the run finished before it could be killed; make it longer"
    r = subprocess.run([sys.executable, "-m", "megacoach.cli_entry", "train", "--resume", str(cut)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _metrics(cut) == _metrics(full)


def test_andon_errors(tmp_path, capsys):
    assert main(["andon", str(tmp_path / "none"), "--reason", "bad"]) == 2
    assert "no megacoach run" in capsys.readouterr().err
