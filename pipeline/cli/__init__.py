"""The `shipyard` command: builds or overrides a recipe and calls the pipeline, nothing more.

`group` holds the group and how every command ends; each other module registers its commands on it.
"""

from pipeline.cli import cache, recipes, release, stages  # noqa: F401  (registers the commands)
from pipeline.cli.group import cli, main

__all__ = ["cli", "main"]
