"""`shipyard recipe validate|show|schema` and `shipyard run`: the whole pipeline from a recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.cli.group import GATE_FAILED, ShipyardGroup, cli
from pipeline.cli.options import (
    allow_pickle_option,
    console,
    output_options,
    progress_for,
    set_option,
)

# --- recipes -------------------------------------------------------------------------------

@cli.group(cls=ShipyardGroup)
def recipe() -> None:
    """Check, resolve and describe recipes."""


@recipe.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@set_option
def recipe_validate(file: Path, overrides: tuple[str, ...]) -> None:
    """Check a recipe against the schema, and its model folder where it is on this machine (family,
    task, weights, tokenizer: what a run checks before any stage); exit 0 if it is valid."""
    from pipeline.inputs.model import inspect_model
    from pipeline.recipe import load_recipe

    loaded = load_recipe(file, overrides)
    model = loaded.model
    if model.path.is_dir():
        info = inspect_model(model.path, model.task, model.allow_pickle)
        click.echo(f"{file}: valid recipe {loaded.name!r} ({info.model_type} {info.task_name} model checked)")
    else:
        click.echo(f"{file}: valid recipe {loaded.name!r} (model {model.path} is not on this machine: not checked)")


@recipe.command("show")
@click.argument("file", type=click.Path(path_type=Path))
@set_option
def recipe_show(file: Path, overrides: tuple[str, ...]) -> None:
    """Print the resolved recipe: defaults filled in, overrides applied, paths absolute."""
    from pipeline.recipe import load_recipe

    click.echo(load_recipe(file, overrides).to_yaml(), nl=False)


@recipe.command("schema")
@click.option("--manifest", is_flag=True, help="Print the manifest's schema instead.")
def recipe_schema(manifest: bool) -> None:
    """Print the JSON Schema of recipes (as committed in recipes/recipe.schema.json)."""
    if manifest:
        from pipeline.release.manifest import manifest_json_schema as schema
    else:
        from pipeline.recipe import recipe_json_schema as schema
    click.echo(json.dumps(schema(), indent=2))


# --- the whole pipeline -------------------------------------------------------------------

@cli.command()
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Release folder to write [default: release/<recipe name>].")
@click.option("--overwrite", is_flag=True, help="Replace the release folder if it exists.")
@click.option("--target", "target_names", multiple=True, metavar="NAME",
              help="Only these recipe targets (repeatable); one job per target when fanned out.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Stage cache folder [default: $SHIPYARD_CACHE_DIR, else ~/.cache/shipyard].")
@click.option("--no-cache", is_flag=True, help="Recompute every stage; neither read nor write the cache.")
@click.option("--wait", is_flag=True, help="If another run holds --out, wait for it instead of exiting 2.")
@click.option("--no-engines", is_flag=True,
              help="Make and check every target's ONNX but build no engine: phase one of a two-phase release "
                   "(shipyard engines builds each target's engine from the release on its GPU).")
@click.option("--sign-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 private key (PEM): sign manifest.json into manifest.json.sig.")
@allow_pickle_option
@set_option
@output_options
def run(recipe_file: Path, out: Path | None, overwrite: bool, target_names: tuple[str, ...], cache_dir: Path | None,
        no_cache: bool, wait: bool, no_engines: bool, sign_key: Path | None, allow_pickle: bool, overrides: tuple[str, ...],
        quiet: bool, as_json: bool) -> None:
    """Run every stage of RECIPE and gate each artifact's parity against PyTorch.

    Finished stages are reused from the stage cache when their inputs are unchanged; the
    summary and the manifest say which."""
    from pipeline.cli.summary import print_run_summary
    from pipeline.recipe import load_recipe
    from pipeline.run.cache import StageCache
    from pipeline.run.workflow import RunOptions, run_recipe

    loaded = load_recipe(recipe_file, overrides + (("model.allow_pickle=true",) if allow_pickle else ()))
    out = out or Path("release") / loaded.name
    options = RunOptions(overwrite=overwrite, target_names=target_names, wait=wait, sign_key=sign_key,
                         cache=StageCache.at(cache_dir, enabled=not no_cache), build_engines=not no_engines,
                         command=tuple(sys.argv))
    outcome = run_recipe(loaded, out, progress_for(quiet, as_json), options)
    if as_json:
        click.echo(json.dumps({"out": str(out), "passed": outcome.passed,
                               "manifest": json.loads(outcome.manifest.model_dump_json())}))
    elif not quiet:
        print_run_summary(console(False, False), outcome)
    sys.exit(0 if outcome.passed else GATE_FAILED)
