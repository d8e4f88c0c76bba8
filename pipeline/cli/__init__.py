"""The `shipyard` command (`pipeline.cli.commands`)."""

from pipeline.cli.commands import cli, main

__all__ = ["cli", "main"]
