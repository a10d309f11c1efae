"""The `megacoach` command line: thin typer commands, each loads a config and calls one function.

This module only assembles the commands (megacoach.commands, and megacoach.app.cli for the labeling app)
into one app, by name, in the order `megacoach --help` lists them. Every flag maps to a config field (see
megacoach.commands.common). Bad input prints one line naming the problem and exits with code 2.
"""

from __future__ import annotations

import sys

import typer

from megacoach.app import cli as labeling_app
from megacoach.commands import config, incident, labels, model, reward, train
from megacoach.commands.common import run_app

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="megacoach: fine-tune a language model (the Apprentice) from human preferences, "
                       "with guards against the sign-flip incident.")

app.command("pretrain")(model.pretrain)
app.command("sample")(model.sample)
app.command("export-merged")(model.export_merged)
app.command("incident")(incident.incident)
app.command("train")(train.train)
app.command("andon")(train.andon)

app.add_typer(config.app, name="config")

label_app = typer.Typer(no_args_is_help=True,
                        help="Human evaluators: collect, import, export labels; the labeling app.")
label_app.add_typer(labels.app)  # auto, export, import
label_app.add_typer(labeling_app.app)  # serve, create-admin, reset-password, invite, token
app.add_typer(label_app, name="label")

app.add_typer(reward.app, name="reward")
app.add_typer(model.app, name="model")


def main(argv: list[str] | None = None) -> int:
    """Run `megacoach` on argv (default: sys.argv); returns the exit code."""
    return run_app(app, argv)


def entrypoint():  # pragma: no cover
    sys.exit(main())
