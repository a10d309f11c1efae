"""The `megacoach` command line: thin typer commands, each loads a config and calls one function.

Every flag maps to a config field: the common ones have their own flags; any field can be set with
`--set SECTION.FIELD=VALUE`; a whole file with `--config run.yaml`; a preset with `--preset NAME`.
Bad input prints one line naming the problem and exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from megacoach.config import Config, describe_fields, load_config, parse_override
from megacoach.errors import HaltError, MegacoachError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="megacoach: fine-tune a language model (the Apprentice) from human preferences, "
                       "with guards against the sign-flip incident.")
config_app = typer.Typer(no_args_is_help=True, help="Show and check configurations.")
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML or TOML config file.")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Preset: paper-sentiment, tiny.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any field: SECTION.FIELD=VALUE.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="model.name_or_path: 'builtin', a folder or a hub name.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="run.seed")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="run.out: the run folder.")]


def resolve_config(config: Path | None, preset: str | None, sets: list[str] | None, **fields) -> Config:
    """Config from defaults <- preset <- file <- --set <- dedicated flags (given as dotted names)."""
    overrides = [parse_override(s) for s in (sets or [])]
    for dotted, value in fields.items():
        if value is not None:
            sec, name = dotted.split("__")
            overrides.append({sec: {name: str(value) if isinstance(value, Path) else value}})
    return load_config(config, preset, overrides)


# ------------------------------------------------------------------------------------------ commands
@app.command()
def pretrain(
    out: Annotated[Path, typer.Option("--out", help="Where to save the model and tokenizer.")] = Path("runs/builtin_model"),
    max_steps: Annotated[int, typer.Option(help="Optimiser steps (the shipped model: 1000).")] = 1000,
    n_layer: Annotated[int, typer.Option(help="Transformer layers.")] = 4,
    n_embd: Annotated[int, typer.Option(help="Width.")] = 256,
    n_head: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary.")] = 8192,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
):
    """Rebuild the built-in Shakespeare base model (tokenizer + GPT-2) from scratch; report held-out perplexity."""
    from megacoach.lm.pretrain import PretrainSettings, pretrain as run_pretrain

    s = PretrainSettings(max_steps=max_steps, n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                         seed=seed, threads=threads)
    summary = run_pretrain(out, s, log=console.print)
    console.print(f"[bold]held-out perplexity {summary['heldout_perplexity']}[/] ({', '.join(summary['heldout_plays'])}); "
                  f"{summary['parameters']:,} parameters; {summary['seconds']:.0f} s; saved to {out}")


@app.command()
def sample(
    config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None, model: ModelOpt = None, seed: SeedOpt = None,
    n: Annotated[int, typer.Option("--n", help="Continuations per query (labels.k).")] = 4,
    queries: Annotated[int, typer.Option("--queries", help="How many queries.")] = 1,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Use this text as the query.")] = None,
):
    """Print continuations of Shakespeare prompts from the Apprentice (default: the built-in model)."""
    from megacoach.continuations import print_samples

    cfg = resolve_config(config, preset, set_, model__name_or_path=model, run__seed=seed)
    print_samples(cfg, n=n, n_queries=queries, prompt=prompt, console=console)


@config_app.command("show")
def config_show(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None,
                fields: Annotated[bool, typer.Option("--fields", help="List every field with its description.")] = False):
    """Print the resolved config as YAML (or every field with its default and description)."""
    import yaml

    if fields:
        table = Table("field", "default", "description", show_lines=False)
        for row in describe_fields():
            table.add_row(*row)
        console.print(table)
        return
    cfg = resolve_config(config, preset, set_)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), markup=False, highlight=False)


def _register_optional():
    """Commands whose modules pull in heavier dependencies register here (kept import-light at start)."""
    from megacoach import commands  # noqa: F401  (registers label/reward/train/... on `app`)


def main(argv: list[str] | None = None) -> int:
    try:
        _register_optional()
    except ImportError:  # pragma: no cover
        pass
    try:
        app(args=argv, standalone_mode=False)
    except HaltError as err:
        err_console.print(f"[bold red]halted:[/] {err}")
        return err.exit_code
    except MegacoachError as err:
        err_console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False)
        return 2
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except SystemExit as err:  # typer/click exits (--help)
        return int(err.code or 0)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            return 2
        raise
    return 0


def entrypoint():  # pragma: no cover
    sys.exit(main())
