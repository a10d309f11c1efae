"""The command line's commands, one module per command or group; megacoach.cli assembles them into `megacoach`.

Importing a module here registers nothing anywhere: each module owns its commands (plain functions or its
own typer app) and imports nothing from megacoach.cli; what they share is in commands.common.
"""
