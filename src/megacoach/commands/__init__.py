"""CLI command groups beyond the core ones; importing this package registers them on `megacoach.cli.app`."""

from megacoach.commands import incident, labels, train  # noqa: F401
