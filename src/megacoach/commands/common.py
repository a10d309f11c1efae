"""What every command shares: the consoles, the config options, config resolution, the label store, and
running a typer app so that bad input prints one line naming the problem and exits with code 2.

Every flag maps to a config field: the common ones have their own flags; any field can be set with
`--set SECTION.FIELD=VALUE`; a whole file with `--config run.yaml`; a preset with `--preset NAME`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from megacoach.config import Config, load_config, parse_override
from megacoach.errors import HaltError, MegacoachError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML or TOML config file.")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Preset: paper-sentiment, tiny, smollm2-sentiment, smollm2-instruct.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any field: SECTION.FIELD=VALUE.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="model.name_or_path: 'builtin', a folder, a .gguf file, smollm2-135m-instruct or a hub name.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="run.seed")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="run.out: the run folder.")]
DbOpt = Annotated[Optional[str], typer.Option("--db", help="labels.db: SQLAlchemy URL or SQLite path of the label store.")]


def resolve_config(config: Path | None, preset: str | None, sets: list[str] | None, **fields) -> Config:
    """Config from defaults <- preset <- file <- --set <- dedicated flags (given as dotted names)."""
    overrides = [parse_override(s) for s in (sets or [])]
    for dotted, value in fields.items():
        if value is not None:
            sec, name = dotted.split("__")
            overrides.append({sec: {name: str(value) if isinstance(value, Path) else value}})
    return load_config(config, preset, overrides)


def open_store(db: str | None, cfg: Config | None = None):
    """The label store named by --db, else by the config's labels.db, else ./labels.db."""
    # SQLAlchemy: imported when a command opens the store, keeps `megacoach --help` light
    from megacoach.labels.store import LabelStore

    return LabelStore(db or (cfg.labels.db if cfg is not None else None) or "sqlite:///labels.db")


def run_app(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run `app` on argv (default: sys.argv) and return the exit code: bad input is one line on stderr and 2."""
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
    except Exception as err:
        if not _is_usage_error(err):
            raise
        err.show()  # e.g. "No such command", "Missing argument" (no arguments: the help)
        return 2
    return 0


def _is_usage_error(err: Exception) -> bool:
    """A usage error of the command line: typer's own (typer >= 0.2x bundles click) or click's."""
    if isinstance(err, getattr(typer, "TyperException", ())) and hasattr(err, "show"):
        return True
    try:
        import click
    except ImportError:
        return False
    return isinstance(err, click.ClickException)
