"""The stage cache: `shipyard cache ls` and `shipyard cache prune`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from pipeline.cli.group import ShipyardGroup, cli
from pipeline.cli.options import output_options

cache_dir_option = click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                                help="Stage cache folder [default: $SHIPYARD_CACHE_DIR, else ~/.cache/shipyard].")


@cli.group("cache", cls=ShipyardGroup)
def cache_group() -> None:
    """List and bound the stage cache (after each store, entries past the size cap,
    $SHIPYARD_CACHE_MAX_SIZE or 20 GB, are removed least recently used first)."""


def _rows(entries) -> list[dict]:
    return [{"key": e.key, "stage": e.stage, "bytes": e.size,
             "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(e.last_used))} for e in entries]


@cache_group.command("ls")
@cache_dir_option
@output_options
def ls_cmd(cache_dir: Path | None, quiet: bool, as_json: bool) -> None:
    """Every entry, most recently used first: key, stage, size and last use."""
    from pipeline.run.cache import StageCache
    from pipeline.run.cache_size import human_size

    cache = StageCache.at(cache_dir)
    entries = cache.entries()
    total = sum(e.size for e in entries)
    if as_json:
        click.echo(json.dumps({"folder": str(cache.root), "bytes": total, "max_size": cache.max_size,
                               "entries": _rows(entries)}))
        return
    if quiet:
        return
    for row, entry in zip(_rows(entries), entries, strict=True):
        click.echo(f"{row['key'][:16]}  {entry.stage:<22} {human_size(entry.size):>10}  {row['last_used']}")
    cap = human_size(cache.max_size) if cache.max_size is not None else "none"
    click.echo(f"{cache.root}: {len(entries)} entries, {human_size(total)} (cap {cap})")


@cache_group.command("prune")
@cache_dir_option
@click.option("--max-size", default=None, metavar="SIZE",
              help="Keep the most recently used entries that fit in SIZE (500MB, 20GB) [default: the cap, "
                   "$SHIPYARD_CACHE_MAX_SIZE or 20 GB].")
@click.option("--older-than", default=None, metavar="AGE", help="Remove entries unused for longer than AGE (12h, 30d, 2w).")
@output_options
def prune_cmd(cache_dir: Path | None, max_size: str | None, older_than: str | None, quiet: bool, as_json: bool) -> None:
    """Remove entries: those unused for longer than --older-than, then the least recently used
    until the rest fit in --max-size. A run in progress keeps what it already copied."""
    from pipeline.run.cache import StageCache
    from pipeline.run.cache_size import human_size, parse_age, parse_size

    limit = parse_size(max_size, "--max-size") if max_size is not None else None
    age = parse_age(older_than, "--older-than") if older_than is not None else None
    cache = StageCache.at(cache_dir)
    if limit is None and age is None:
        limit = cache.max_size
    removed = cache.prune(limit, age)
    kept = cache.entries()
    kept_bytes = sum(e.size for e in kept)
    if as_json:
        click.echo(json.dumps({"folder": str(cache.root), "removed": _rows(removed), "kept": len(kept),
                               "bytes": kept_bytes}))
    elif not quiet:
        click.echo(f"pruned {cache.root}: removed {len(removed)} entries ({human_size(sum(e.size for e in removed))}), "
                   f"kept {len(kept)} ({human_size(kept_bytes)})")
