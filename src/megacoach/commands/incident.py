"""`megacoach incident`: reproduce the paper's section 4.4 bug on the built-in model, and watch the guards stop it.

A "refactor" flips the sign of the reward and, by the same slip, of the KL penalty, so PPO maximises
-score - β·KL: the text stays fluent (the KL penalty still holds it near the original model) and turns as
negative as the human evaluators (here: the VADER mock labeler) can judge.

    megacoach incident                  guards on: refused by the preflight before the first update
    megacoach incident --monitors-only  no preflight: the batch check / live monitors halt it
    megacoach incident --no-guards      the incident as it happened: fluent and maximally negative
    megacoach incident --bug reward-flip --no-guards   the reward alone flipped: gibberish
    megacoach incident --list-bugs      every bug kind
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.panel import Panel
from rich.table import Column, Table

from megacoach.commands.common import console
from megacoach.config import parse_override
from megacoach.errors import ConfigError


def incident(
    bug: Annotated[str, typer.Option("--bug", help="Bug kind (see --list-bugs).")] = "incident",
    no_guards: Annotated[bool, typer.Option("--no-guards", help="Run without guards: see what the bug does.")] = False,
    monitors_only: Annotated[bool, typer.Option("--monitors-only", help="Guards on but no preflight: the batch "
                                                "check and live monitors must catch it.")] = False,
    labelers_only: Annotated[bool, typer.Option("--labelers-only", help="No preflight and no batch check: only the "
                                                "monitors that watch samples and labels.")] = False,
    iterations: Annotated[int, typer.Option("--iterations", help="PPO iterations (batch 64 each).")] = 80,
    comparisons: Annotated[int, typer.Option("--comparisons", help="Labeled comparisons for the Values Coach "
                                             "(made once, cached; below ~2,000 the Values Coach is near chance).")] = 4000,
    model: Annotated[str, typer.Option("--model", help="model.name_or_path")] = "builtin",
    seed: Annotated[int, typer.Option("--seed", help="run.seed")] = 1,
    out: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/incident"),
    cache: Annotated[Path, typer.Option("--cache", help="Where labels and Values Coaches are cached.")] = Path("runs/incident-cache"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any field: SECTION.FIELD=VALUE.")] = None,
    list_bugs: Annotated[bool, typer.Option("--list-bugs", help="List the bug kinds and exit.")] = False,
):
    """Reproduce section 4.4 (a sign-flipped reward) with VADER as the human evaluators; guards on by default."""
    # torch-heavy: imported when the command runs, keeps `megacoach --help` free of torch
    from megacoach.guards.bugs import BUGS, get
    from megacoach.incident import run_scenario

    if list_bugs:
        t = Table(Column("bug", no_wrap=True), "what the refactor did", "PPO maximises", "what it produces")
        for b in BUGS.values():
            t.add_row(b.name, b.summary, b.maximises, b.outcome)
        console.print(t)
        return
    b = get(bug)
    if sum([no_guards, monitors_only, labelers_only]) > 1:
        raise ConfigError("--no-guards, --monitors-only and --labelers-only exclude each other")
    if iterations < 1 or comparisons < 16:
        raise ConfigError("--iterations must be >= 1 and --comparisons >= 16")
    mode = "off" if no_guards else "monitors" if monitors_only else "labelers" if labelers_only else "full"
    overrides = [{"model": {"name_or_path": model}, "run": {"seed": seed, "max_iterations": iterations},
                  "labels": {"num_comparisons": comparisons}, "ppo": {"total_episodes": 64 * iterations}}]
    overrides += [parse_override(s) for s in set_ or []]
    console.print(Panel(f"[bold]bug {b.name}[/]: {b.summary}\nPPO now maximises [bold]{b.maximises}[/] "
                        f"(correct: score − β·KL); expected without guards: {b.outcome}.\nGuards: "
                        f"{ {'full': 'all on', 'monitors': 'no preflight (batch check + live monitors)', 'labelers': 'live monitors on samples and labels only', 'off': 'OFF'}[mode] }",
                        title="megacoach incident", title_align="left"))
    o = run_scenario(b.name, mode, out, cache, overrides, console)
    show(o)


def show(o) -> None:
    ini, fin = o.initial, o.final
    t = Table("", "initial policy", "at the end" if not o.halted else "at the halt", box=None)
    t.add_row("labelers' score (VADER, held-out queries)", f"{ini['labeler_mean']:+.3f} (sd {ini['labeler_sd']:.2f})",
              f"{fin['labeler_mean']:+.3f}  ({-o.labeler_score_drop:+.2f} sd)")
    t.add_row("KL to the original model (nats)", f"{ini['kl']:.2f}", f"{fin['kl']:.2f}")
    t.add_row("perplexity under the original model", f"{ini['ppl']:.0f}", f"{fin['ppl']:.0f}")
    t.add_row("valid responses", f"{ini['valid']:.0%}", f"{fin['valid']:.0%}")
    if o.halted:
        when = ("before the first update (preflight)" if o.iterations_to_halt == 0
                else f"after {o.iterations_to_halt} PPO update(s)")
        head = f"[bold red]STOPPED[/] {when} by {o.stopped_by}\n{o.reason}"
    else:
        head = f"[bold]ran {o.iterations} iterations without being stopped[/]"
    console.print(Panel(head, title="what happened", title_align="left"))
    console.print(t)
    s = Table("query (end)", "initial policy", "Apprentice" + (" at the halt" if o.halted else " at the end"),
              show_lines=True)
    for r in o.samples[:6]:
        s.add_row(r["query"][-60:], f"{r['initial']}\n[dim]VADER {r['initial_labeler']:+.2f}[/]",
                  f"{r['final']}\n[dim]VADER {r['final_labeler']:+.2f}[/]")
    console.print(s)
    console.print(f"[dim]run folder: {o.run_dir} (report.html, metrics.jsonl, incident.json"
                  f"{', HALTED.json' if o.halted and o.iterations_to_halt else ''}"
                  f"{', guards_preflight.json' if o.stopped_by and 'preflight' in o.stopped_by else ''})[/]")
