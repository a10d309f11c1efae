"""`megacoach config ...`: show and check configurations."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml
from rich.table import Table

from megacoach.commands.common import ConfigOpt, PresetOpt, SetOpt, console, resolve_config
from megacoach.config import describe_fields

app = typer.Typer(no_args_is_help=True, help="Show and check configurations.")


@app.command("show")
def show(config: ConfigOpt = None, preset: PresetOpt = None, set_: SetOpt = None,
         fields: Annotated[bool, typer.Option("--fields", help="List every field with its description.")] = False):
    """Print the resolved config as YAML (or every field with its default and description)."""
    if fields:
        table = Table("field", "default", "description", show_lines=False)
        for row in describe_fields():
            table.add_row(*row)
        console.print(table)
        return
    cfg = resolve_config(config, preset, set_)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), markup=False, highlight=False)
