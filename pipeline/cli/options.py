"""What several commands share: output flags, recipe overrides, progress and the last line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from pipeline.cli.group import GATE_FAILED
from pipeline.names import MAX_TOKENS
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


def overwrite_option(func):
    """--overwrite for the stage commands: one rule with `run` (an existing output is replaced only
    when asked)."""
    return click.option("--overwrite", is_flag=True,
                        help="Replace --out (and what the stage writes beside it) if it exists.")(func)


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


def calibration_rows_options(calibration_help: str, tokenizer_help: str):
    """--calibration, --tokenizer, the columns, --samples, --max-length and --encoding of `prune`
    and `quantize`, passed on as one `rows` (`pipeline.run.standalone.CalibrationRows`)."""

    def decorate(func):
        @click.option("--calibration", type=click.Path(path_type=Path), default=None, help=calibration_help)
        @click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help=tokenizer_help)
        @click.option("--text-column", default=schema_default("data.text_column"), show_default=True)
        @click.option("--text-pair-column", default=None)
        @click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True,
                      help="Calibration rows to draw (seeded).")
        @click.option("--max-length", type=click.IntRange(8, MAX_TOKENS), default=schema_default("data.max_length"),
                      show_default=True)
        @encoding_option
        @functools.wraps(func)
        def wrapper(*args, calibration: Path | None, tokenizer: Path | None, text_column: str,
                    text_pair_column: str | None, samples: int, max_length: int, encoding: str | None, **kwargs):
            from calibration.sampling import Columns
            from pipeline.run.standalone import CalibrationRows

            rows = CalibrationRows(calibration, tokenizer, Columns(text_column, text_pair_column), samples, max_length,
                                   encoding)
            return func(*args, rows=rows, **kwargs)

        return wrapper

    return decorate


def prune_spec_options(func):
    """The pruning options of `shipyard prune`, passed on as one `spec` (a recipe's PruneSpec)."""
    from pipeline.names import FFN_SCOPES, SPARSITY_24

    @click.option("--ffn", "ffn_fraction", type=click.FloatRange(0, 1, max_open=True),
                  default=schema_default("prune.ffn_fraction"), show_default=True,
                  help="Fraction of FFN neurons to remove per layer, in [0, 1).")
    @click.option("--ffn-scope", type=click.Choice(FFN_SCOPES), default=schema_default("prune.ffn_scope"),
                  show_default=True)
    @click.option("--ffn-multiple", type=click.IntRange(min=1), default=schema_default("prune.ffn_multiple"),
                  show_default=True, help="Each layer keeps a multiple of this many FFN neurons (64 suits CPU and "
                  "GPU matrix kernels).")
    @click.option("--heads-per-layer", type=click.IntRange(min=0), default=schema_default("prune.heads_per_layer"),
                  show_default=True, help="Remove this many lowest-scored heads in every layer.")
    @click.option("--prune-heads", "heads_json", default=None, metavar="JSON",
                  help='Exact heads to remove, e.g. \'{"0": [1, 2], "2": [0]}\' (needs no data).')
    @click.option("--sparsity-24", type=click.Choice(SPARSITY_24), default=schema_default("prune.sparsity_24"),
                  show_default=True, help="2:4 semi-structured sparsity on these MatMul weights.")
    @click.option("--compensate/--no-compensate", default=schema_default("prune.compensate"), show_default=True,
                  help="Fold removed units' mean output into the next bias (scored pruning only).")
    @functools.wraps(func)
    def wrapper(*args, ffn_fraction: float, ffn_scope: str, ffn_multiple: int, heads_per_layer: int,
                heads_json: str | None, sparsity_24: str, compensate: bool, **kwargs):
        from pipeline.recipe import PruneSpec

        spec = PruneSpec(enabled=True, ffn_fraction=ffn_fraction, ffn_scope=ffn_scope, ffn_multiple=ffn_multiple,
                         heads_per_layer=heads_per_layer, heads=_parse_heads(heads_json),
                         sparsity_24=sparsity_24, compensate=compensate)
        return func(*args, spec=spec, **kwargs)

    return wrapper


def _parse_heads(heads_json: str | None) -> dict[int, list[int]] | None:
    from pipeline.errors import ShipyardError

    if heads_json is None:
        return None
    try:
        raw = json.loads(heads_json)
        return {int(layer): [int(h) for h in heads] for layer, heads in raw.items()}
    except (ValueError, TypeError, AttributeError):
        raise ShipyardError(
            f"--prune-heads {heads_json!r}: expected JSON like '{{\"0\": [1, 2], \"2\": [0]}}'"
        ) from None
