"""The command line's shape: every command and group, in order, each with working --help; no import side effects;
`train --resume` applies the saved config, then --config, then --set (and none of the other flags)."""

from __future__ import annotations

import re

import subprocess
import sys

import pytest
import typer

from megacoach.cli import app, main
from megacoach.config import build_config, save_config

TOP = ["pretrain", "sample", "export-merged", "incident", "train", "andon", "config", "label", "reward", "model"]
GROUPS = {"config": ["show"], "label": ["auto", "export", "import", "serve", "create-admin", "reset-password", "invite",
                    "token"],
          "reward": ["train", "eval"], "model": ["import", "get"]}


def _names(group) -> list[str]:
    return list(group.list_commands(typer.Context(group)))


def test_commands_and_groups_in_help_order():
    root = typer.main.get_command(app)
    assert _names(root) == TOP
    for name, subs in GROUPS.items():
        assert _names(root.get_command(typer.Context(root), name)) == subs


@pytest.mark.parametrize("argv", [[c] for c in TOP] + [[g, s] for g, subs in GROUPS.items() for s in subs],
                         ids=" ".join)
def test_every_command_has_help(argv, capsys):
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage:" in out and " ".join(argv) in out
    for sub in GROUPS.get(argv[0], []) if len(argv) == 1 else []:
        assert sub in out


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    # each name where a row of the command list starts, not inside a description ("the built-in model")
    positions = [re.search(rf"^\W*{re.escape(c)} ", out, re.M).start() for c in TOP]
    assert positions == sorted(positions)


def test_reward_help(capsys):
    assert main(["reward", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Values Coach" in out and "train" in out and "eval" in out


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_command_modules_import_nothing_from_the_cli():
    mods = ["common", "config", "incident", "labels", "model", "reward", "train"]
    r = _python("import sys\n" + "".join(f"import megacoach.commands.{m}\n" for m in mods) +
                "import megacoach.app.cli\nprint(sorted(m for m in sys.modules if m == 'megacoach.cli'))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_help_imports_no_torch_web_stack_or_database():
    r = _python("import io, sys, contextlib\nfrom megacoach.cli import main\n"
                "with contextlib.redirect_stdout(io.StringIO()):\n    rc = main(['--help'])\n"
                "print(rc, sorted(m for m in ('torch', 'sqlalchemy', 'fastapi', 'uvicorn') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0 []"


def test_resume_takes_the_saved_config_then_config_then_set(tmp_path, monkeypatch):
    import megacoach.pipeline

    run = tmp_path / "run"
    saved = build_config({"model": {"name_or_path": "builtin"}, "run": {"seed": 7, "out": "runs/moved"},
                          "ppo": {"learning_rate": 1e-4, "total_episodes": 128}, "kl": {"target": 4.0},
                          "labels": {"num_comparisons": 64}, "guards": {"enabled": False}})
    save_config(saved, run / "config.yaml")
    fix = tmp_path / "fix.yaml"
    fix.write_text("ppo:\n  learning_rate: 2.0e-4\nkl:\n  target: 5.0\n")
    seen = {}

    def fake_train(cfg, resume, console):
        seen.update(cfg=cfg, resume=resume)

    monkeypatch.setattr(megacoach.pipeline, "train", fake_train)
    assert main(["train", "--resume", str(run), "--config", str(fix), "--set", "ppo.learning_rate=3e-4",
                 "--seed", "9", "--model", "elsewhere", "--episodes", "99", "--comparisons", "32", "--out",
                 str(tmp_path / "other"), "--preset", "tiny", "--online"]) == 0
    cfg = seen["cfg"]
    assert seen["resume"] is True and seen["cfg"].guards.enabled is False
    assert cfg.ppo.learning_rate == 3e-4 and cfg.kl.target == 5.0  # --set beats --config beats the saved config
    # the dedicated flags and --preset do not apply to a resumed run; it stays in its folder
    assert cfg.run.seed == 7 and cfg.model.name_or_path == "builtin" and cfg.ppo.total_episodes == 128
    assert cfg.labels.num_comparisons == 64 and cfg.online.enabled is False and cfg.run.out == str(run)


def test_resume_of_a_folder_without_a_run_is_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "not a megacoach run folder" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [(["bogus"], "No such command 'bogus'"),
                                           (["train", "--bogus-flag"], "No such option: --bogus-flag"),
                                           (["reward", "eval"], "Missing argument"),
                                           (["andon", "runs/x"], "Missing option '--reason'")])
def test_usage_errors_exit_2_without_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_arguments_print_the_help(capsys):
    assert main([]) == 2
    assert "Usage:" in capsys.readouterr().out
