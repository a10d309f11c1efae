"""Errors that reach the user as one clear line (the CLI prints them and exits with code 2)."""


class MegacoachError(Exception):
    """Base class: the message names the problem and what was expected."""


class ConfigError(MegacoachError):
    """A configuration field, CLI flag or config file is wrong."""


class DataError(MegacoachError):
    """Input data (queries, label files, checkpoints, store contents) is wrong or unreadable."""


class StoreError(MegacoachError):
    """The label store cannot be opened or written (locked, unreachable, newer schema)."""


class HaltError(MegacoachError):
    """Training was halted by a guard or the Andon cord; a checkpoint and HALTED.json were written."""

    exit_code = 3
