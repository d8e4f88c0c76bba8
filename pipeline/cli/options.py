"""What several commands share: output flags, recipe overrides, progress and the last line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from pipeline.cli.group import GATE_FAILED
from pipeline.recipe import Gate, Thresholds
from pipeline.recipe.defaults import schema_default as schema_default


def gate_help(threshold: str) -> str:
    """`[default: ...]` for a threshold option, from the schema's default gates."""
    defaults = Thresholds()
    parts = []
    for kind in ("fp32", "pruned", "fp16", "int8"):
        gate: Gate = getattr(defaults, kind)
        value = getattr(gate, threshold)
        parts.append(f"{value:g} for {kind.upper() if kind != 'pruned' else 'pruned graphs'}" if value is not None
                     else f"unchecked for {kind.upper() if kind != 'pruned' else 'pruned graphs'}")
    return "[default: " + ", ".join(parts) + "]"


def console(quiet: bool, as_json: bool):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet or as_json)


def progress_for(quiet: bool, as_json: bool):
    from pipeline.progress import Progress, RichProgress

    return Progress() if quiet or as_json else RichProgress(console(quiet, as_json))


def output_options(func):
    """--quiet and --json, shared by every command that does work."""

    @click.option("--quiet", is_flag=True, help="Print nothing but errors.")
    @click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON object.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def cache_options(func):
    """--cache-dir and --no-cache: the stage cache a command reads and writes, as `shipyard run`'s."""

    @click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                  help="Stage cache folder [default: $SHIPYARD_CACHE_DIR, else ~/.cache/shipyard].")
    @click.option("--no-cache", is_flag=True, help="Recompute; neither read nor write the cache.")
    @functools.wraps(func)
    def wrapper(*args, cache_dir: Path | None, no_cache: bool, **kwargs):
        from pipeline.run.cache import StageCache

        return func(*args, cache=StageCache.at(cache_dir, enabled=not no_cache), **kwargs)

    return wrapper


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a recipe value, e.g. --set data.max_length=64 (repeatable).")
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Accept pytorch_model.bin (pickle) weights, loaded with torch.load(weights_only=True) [default: safetensors only].")
encoding_option = click.option("--encoding", default=None, metavar="CODEC",
                               help="Text encoding of a .csv/.txt data file [default: UTF-8].")


def finish(passed: bool, payload: dict, line: str, quiet: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(payload, default=str))
    elif not quiet:
        click.echo(line)
    sys.exit(0 if passed else GATE_FAILED)
