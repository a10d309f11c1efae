"""`python -m megacoach.cli_entry ...` == the `megacoach` command (used by tests and scripts)."""

from megacoach.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
