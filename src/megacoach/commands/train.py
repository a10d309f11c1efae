"""`megacoach train` (the whole RLHF loop) and `megacoach andon` (stop a running training)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from megacoach.commands.common import ConfigOpt, ModelOpt, OutOpt, PresetOpt, SeedOpt, SetOpt, console, resolve_config
from megacoach.config import parse_override, resume_config
from megacoach.errors import ConfigError


def train(
    config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, model: ModelOpt = None,
    seed: SeedOpt = None, out: OutOpt = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder (its saved config; "
                                                   "--config/--set may change fields, e.g. after a halt).")] = None,
    labeler: Annotated[Optional[str], typer.Option("--labeler", help="labels.labeler")] = None,
    comparisons: Annotated[Optional[int], typer.Option("--comparisons", help="labels.num_comparisons")] = None,
    episodes: Annotated[Optional[int], typer.Option("--episodes", help="ppo.total_episodes")] = None,
    db: Annotated[Optional[str], typer.Option("--db", help="labels.db (SQLAlchemy URL)")] = None,
    no_guards: Annotated[bool, typer.Option("--no-guards", help="guards.enabled = false (not recommended)")] = False,
    online: Annotated[bool, typer.Option("--online", help="online.enabled: people (and/or a mock labeler) label "
                                         "current-policy samples while PPO runs; the Values Coach is retrained.")] = False,
):
    """Run the RLHF loop: mock human evaluators -> Values Coach -> PPO on the Apprentice -> report."""
    # torch-heavy: imported when the command runs, keeps `megacoach --help` free of torch
    from megacoach.pipeline import train as run_train
    from megacoach.runs import RunDir

    if resume is not None:  # the saved config <- --config <- --set; the other flags do not apply
        saved = RunDir(resume).load_config()
        cfg = resume_config(saved, resume, config, [parse_override(item) for item in set_ or []])
    else:
        cfg = resolve_config(config, preset, set_, model__name_or_path=model, run__seed=seed,
                             run__out=str(out) if out else "runs/latest", labels__labeler=labeler,
                             labels__num_comparisons=comparisons, ppo__total_episodes=episodes, labels__db=db,
                             guards__enabled=False if no_guards else None, online__enabled=True if online else None)
    run_train(cfg, resume=resume is not None, console=console)  # the guards watch it unless guards.enabled=false


def andon(
    run_dir: Annotated[Path, typer.Argument(help="The run folder of a running training.")],
    reason: Annotated[str, typer.Option("--reason", help="Why training must stop.")],
    who: Annotated[str, typer.Option("--who", help="Who pulls the cord.")] = "cli",
):
    """Pull the Andon cord: the running training stops within one iteration (checkpoint + HALTED.json)."""
    # megacoach.runs imports torch: imported when the command runs, keeps `megacoach --help` free of torch
    from megacoach.runs import RunDir

    run = RunDir(run_dir)
    if not (run.path / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no megacoach run there (no config.yaml)")
    status = run.status() or {}
    if status.get("status") in ("finished", "halted"):
        raise ConfigError(f"{run_dir}: the run already {status['status']} at iteration {status.get('iteration')}; "
                          "nothing to stop")
    if not reason.strip():
        raise ConfigError("--reason: say why training must stop")
    run.pull_andon(reason, who)
    console.print(f"Andon cord pulled on {run_dir}: training stops within one iteration.")
