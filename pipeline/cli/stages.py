"""The stages on plain paths: `shipyard export|quantize|prune|recover|validate`."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.group import cli
from pipeline.cli.options import (
    allow_pickle_option,
    cache_options,
    calibration_rows_options,
    encoding_option,
    finish,
    gate_help,
    output_options,
    overwrite_option,
    progress_for,
    prune_spec_options,
    schema_default,
)
from pipeline.errors import ShipyardError
from pipeline.names import (
    CALIBRATION_METHODS,
    CPU_FORMS,
    MAX_TOKENS,
    METRIC_NAMES,
    OPENVINO_FORMS,
    QUANT_FORMATS,
    TASKS,
    QuantFormat,
)
from pipeline.recipe import Thresholds
from pipeline.tasks import METRICS

_PRUNED = Thresholds().pruned
PRUNED_GATE = f"{_PRUNED.min_agreement:g} agreement, {100 * (_PRUNED.max_metric_drop or 0):g} points"

# --- stages on plain paths ----------------------------------------------------------------

@cli.command("export")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Fine-tuned Hugging Face model folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="ONNX file to write.")
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="As Optimum names it [default: from config.json's architectures].")
@click.option("--opset", type=click.IntRange(14, 21), default=schema_default("export.opset"), show_default=True)
@click.option("--atol", type=float, default=schema_default("export.atol"), show_default=True,
              help="Max |logit difference| vs PyTorch; beyond it the export fails (exit 1).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Rows to gate the export on, as a run gates it on its evaluation rows [default: eight probe "
                   "sentences of different lengths].")
@click.option("--samples", type=click.IntRange(min=1), default=schema_default("export.validation_samples"),
              show_default=True, help="Rows of --data the gate runs on (seeded).")
@click.option("--text-column", default=schema_default("data.text_column"), show_default=True)
@click.option("--text-pair-column", default=None)
@click.option("--max-length", type=click.IntRange(8, MAX_TOKENS), default=schema_default("data.max_length"), show_default=True)
@encoding_option
@allow_pickle_option
@overwrite_option
@output_options
@cache_options
def export_cmd(model_dir: Path, out: Path, task: str, opset: int, atol: float, data: Path | None, samples: int,
               text_column: str, text_pair_column: str | None, max_length: int, encoding: str | None,
               allow_pickle: bool, overwrite: bool, cache, quiet: bool, as_json: bool) -> None:
    """Export to ONNX with Optimum and check the logits against PyTorch on real inputs."""
    from pipeline.run.standalone import GateRows, export_and_check

    gate_rows = None if data is None else GateRows(data, samples, text_column, text_pair_column, max_length, encoding)
    result = export_and_check(model_dir, out, task, opset, atol, progress_for(quiet, as_json), allow_pickle, cache,
                              gate_rows, overwrite)
    finish(result.passed, {"out": str(out), "passed": result.passed, "message": result.message,
                            **result.details}, f"export {out}: {result.message}", quiet, as_json)


@cli.command("quantize")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="FP32 ONNX file (from shipyard export).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="INT8 ONNX file to write.")
@calibration_rows_options("Calibration data (.csv .jsonl .txt .parquet or saved dataset folder).",
                          "Folder with the model's tokenizer.")
@click.option("--method", type=click.Choice(CALIBRATION_METHODS), default=schema_default("quantize.method"),
              show_default=True)
@click.option("--tuning-samples", type=click.IntRange(min=0), default=schema_default("data.tuning_samples"),
              show_default=True,
              help="Rows drawn after the calibration rows that choose the float fallback; 0 quantizes every node.")
@click.option("--format", "fmt", type=click.Choice(QUANT_FORMATS), default="qdq", show_default=True,
              help="qdq: explicit Q/DQ for TensorRT; cpu: ONNX Runtime CPU; openvino: OpenVINO IR (--out NAME.xml).")
@click.option("--form", "forms", multiple=True, type=click.Choice(CPU_FORMS + OPENVINO_FORMS),
              help="A candidate form of --format cpu or openvino (repeatable); the fastest that meets the fallback's "
                   "agreement here ships [default: every one of the format's].")
@click.option("--smooth/--no-smooth", default=None,
              help="Smooth activations before INT8 (SmoothQuant, exact in float) [default: for qdq, not for cpu].")
@click.option("--smooth-alpha", type=click.FloatRange(0, 1), default=schema_default("smoothing.alpha"), show_default=True,
              help="How much of each channel's range smoothing moves into the weights.")
@overwrite_option
@output_options
@cache_options
def quantize_cmd(model_path: Path, out: Path, rows, method: str, tuning_samples: int, fmt: QuantFormat,
                 forms: tuple[str, ...], smooth: bool | None, smooth_alpha: float, overwrite: bool, cache, quiet: bool, as_json: bool) -> None:
    """Post-training INT8 quantization of an ONNX model.

    The rows used are recorded (as digests) in the output, so a later `shipyard validate` on the
    same file leaves them out."""
    from pipeline.recipe import QuantizeSpec, SmoothingSpec
    from pipeline.run.standalone import quantize_file

    spec = QuantizeSpec(formats=[fmt], method=method)
    if forms:
        key = {"cpu": "cpu_forms", "openvino": "openvino_forms"}.get(fmt)
        allowed = CPU_FORMS if fmt == "cpu" else OPENVINO_FORMS if fmt == "openvino" else ()
        if key is None or any(f not in allowed for f in forms):
            raise ShipyardError(f"--form {', '.join(forms)}: format {fmt} takes "
                                + (f"the forms {', '.join(allowed)}" if allowed else "no --form"))
        spec = spec.model_copy(update={key: list(forms)})
    smoothed = fmt in spec.smoothing.formats if smooth is None else smooth
    spec.smoothing = SmoothingSpec(formats=[fmt] if smoothed else [], alpha=smooth_alpha)
    result = quantize_file(model_path, out, fmt, spec, rows, tuning_samples, progress_for(quiet, as_json), cache,
                           overwrite)
    art = result.artifacts[0]
    finish(True, {"out": str(out), "sha256": art.sha256, "size_bytes": art.size_bytes,
                   "options": art.options}, f"quantize {out}: {result.message}", quiet, as_json)


@cli.command("prune")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="FP32 ONNX file from shipyard export (unfused).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Pruned ONNX file to write.")
@calibration_rows_options(
    "Calibration data to score neurons and heads (needed by --ffn and --heads-per-layer).",
    "The model folder the graph was exported from (tokenizer, and config.json that the blocks found are checked "
    "against); required.")
@prune_spec_options
@overwrite_option
@output_options
@cache_options
def prune_cmd(model_path: Path, out: Path, rows, spec, overwrite: bool, cache, quiet: bool, as_json: bool) -> None:
    """Shrink an exported BERT by removing FFN neurons and attention heads from the ONNX graph."""
    from pipeline.run.standalone import prune_file

    result = prune_file(model_path, out, spec, rows, progress_for(quiet, as_json), cache, overwrite)
    art = result.artifacts[0]
    finish(True, {"out": str(out), "sha256": art.sha256, "size_bytes": art.size_bytes,
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
@click.option("--text-column", default=schema_default("data.text_column"), show_default=True)
@click.option("--text-pair-column", default=None)
@click.option("--label-column", default=None, help="Gold labels (text classification): mixed into the loss.")
@click.option("--epochs", type=click.IntRange(min=1), default=schema_default("recover.epochs"), show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=schema_default("recover.learning_rate"),
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=schema_default("recover.batch_size"), show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=schema_default("recover.temperature"),
              show_default=True,
              help="Softens teacher and student logits in the KL term.")
@click.option("--label-weight", type=click.FloatRange(0, 1), default=schema_default("recover.label_weight"), show_default=True,
              help="Share of the loss from gold labels (with --label-column).")
@click.option("--hidden-weight", type=click.FloatRange(min=0), default=schema_default("recover.hidden_weight"), show_default=True,
              help="Weight of intermediate-layer matching (each layer's hidden state vs the original's).")
@click.option("--dropout/--no-dropout", default=schema_default("recover.dropout"), show_default=True,
              help="Train the student with the model's dropout (off: distillation fits the original's function).")
@click.option("--samples", type=click.IntRange(min=1), default=4000, show_default=True,
              help="Training rows drawn from --data.")
@click.option("--tuning-samples", type=click.IntRange(min=8), default=schema_default("recover.tuning_samples"), show_default=True,
              help="Rows of --data held out from training; the kept state is the one closest to the original on them.")
@click.option("--eval-every", type=click.IntRange(min=1), default=schema_default("recover.eval_every"), show_default=True,
              help="Steps between checks on the tuning rows (and after the last step).")
@click.option("--patience", type=click.IntRange(min=1), default=schema_default("recover.patience"), show_default=True,
              help="Checks that come no closer before training stops.")
@click.option("--max-length", type=click.IntRange(8, MAX_TOKENS), default=schema_default("data.max_length"), show_default=True)
@click.option("--seed", type=int, default=schema_default("recover.seed"), show_default=True)
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="Default: the reference model head's task.")
@encoding_option
@allow_pickle_option
@overwrite_option
@cache_options
@output_options
def recover_cmd(reference: Path, pruned_path: Path, data: Path, out: Path, text_column: str,
                text_pair_column: str | None, label_column: str | None, epochs: int, max_steps: int | None,
                learning_rate: float, batch_size: int, temperature: float, label_weight: float, hidden_weight: float,
                dropout: bool, samples: int, tuning_samples: int, eval_every: int, patience: int, max_length: int,
                seed: int, task: str | None, encoding: str | None, allow_pickle: bool, overwrite: bool, cache,
                quiet: bool, as_json: bool) -> None:
    """Win back what pruning cost: distil the original PyTorch model into the pruned structure,
    with early stopping on held-out tuning rows, then export and gate it like the original."""
    from calibration.sampling import Columns
    from pipeline.parity.runners import check_onnx_file, torch_device
    from pipeline.recipe import RecoverSpec
    from pipeline.run.standalone import OUT, input_artifact, one_stage
    from pipeline.stages.prune import recover as recover_stage
    from pipeline.stages.prune.recover import TrainingData

    check_onnx_file(pruned_path)
    spec = RecoverSpec(enabled=True, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
                       batch_size=batch_size, temperature=temperature, label_weight=label_weight,
                       hidden_weight=hidden_weight, dropout=dropout, tuning_samples=tuning_samples,
                       eval_every=eval_every, patience=patience, seed=seed)
    training = TrainingData(data, Columns(text_column, text_pair_column, label_column), samples, encoding)
    # As a run's recover stage: the same call, through the same stage cache.
    result = one_stage("recover", out, overwrite, cache, recover_stage.run, reference, input_artifact(pruned_path), training, OUT,
                       spec, max_length, task, schema_default("export.opset"), (),
                       progress=progress_for(quiet, as_json), allow_pickle=allow_pickle, device=torch_device("auto"))
    finish(result.passed, {"out": str(out), **result.details["recovery"]}, f"recover {out}: {result.message}", quiet,
           as_json)


@cli.command("validate")
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The fine-tuned PyTorch model folder (the reference).")
@click.option("--artifact", required=True, type=click.Path(path_type=Path), help="ONNX file or TensorRT engine to check.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Evaluation data.")
@click.option("--text-column", default=schema_default("data.text_column"), show_default=True)
@click.option("--text-pair-column", default=None)
@click.option("--label-column", default=None,
              help="Gold labels (class, per-word IOB2 tags, or answer texts) enable the metric and its drop.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Evaluate a seeded sample of this many rows [default: all].")
@click.option("--max-length", type=click.IntRange(8, MAX_TOKENS), default=schema_default("data.max_length"), show_default=True)
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help=gate_help("min_agreement"))
@click.option("--min-agreement-lower", type=click.FloatRange(0, 1), default=None,
              help="Fail unless the lower end of agreement's 95% Wilson interval reaches this " +
                   gate_help("min_agreement_lower") + ".")
@click.option("--max-abs-diff", type=click.FloatRange(min=0), default=None,
              help=gate_help("max_abs_diff"))
@click.option("--max-metric-drop", type=click.FloatRange(0, 1), default=None,
              help="Fraction, 0.01 = one point (with labels only) " + gate_help("max_metric_drop") + ".")
@click.option("--metric", type=click.Choice(METRIC_NAMES), default=None,
              help="Gated label metric [default: " + ", ".join(f"{m[0]} for {t}" for t, m in METRICS.items() if m) + "].")
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="[default: from the reference's config.json]")
@click.option("--max-answer-tokens", type=click.IntRange(1, 512), default=schema_default("model.max_answer_tokens"),
              show_default=True,
              help="question-answering: longest answer span.")
@click.option("--min-cosine", type=click.FloatRange(0, 1, min_open=True), default=schema_default("thresholds.min_cosine"),
              show_default=True,
              help="feature-extraction: an embedding agrees at this cosine with PyTorch's.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write the parity report as JSON here.")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The pruned (or recovered) FP32 ONNX the artifact was converted from: gate the artifact against "
                   "it with its precision's gate (which the threshold options set), and against --reference with "
                   f"the default pruned gate ({PRUNED_GATE}), as shipyard run does.")
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="An engine's release signing key (PEM): its manifest's signature must verify too before the "
                   "engine is deserialized with TensorRT host code.")
@encoding_option
@allow_pickle_option
@cache_options
@output_options
def validate_cmd(reference: Path, artifact: Path, data: Path, text_column: str,
                 text_pair_column: str | None, label_column: str | None, samples: int | None,
                 max_length: int, min_agreement: float | None, max_abs_diff: float | None,
                 max_metric_drop: float | None, metric: str | None, task: str | None, max_answer_tokens: int,
                 min_cosine: float, report_path: Path | None, source: Path | None, encoding: str | None,
                 allow_pickle: bool, cache, quiet: bool, as_json: bool,
                 min_agreement_lower: float | None = None, public_key: Path | None = None) -> None:
    """Gate an artifact's parity with its PyTorch reference: exit 0 pass, 1 fail.

    Rows the artifact was calibrated or tuned on (recorded inside it by shipyard quantize,
    prune and run) are left out of the evaluation rows. The reference's outputs and the verdict
    go through the stage cache, as a run's do."""
    from pipeline.run.standalone import validate_file

    report = validate_file(reference, artifact, data, text_column, text_pair_column, label_column,
                           samples, max_length, min_agreement, max_abs_diff, max_metric_drop,
                           metric, report_path, progress_for(quiet, as_json), task, max_answer_tokens, min_cosine,
                           encoding, allow_pickle, source, cache, min_agreement_lower=min_agreement_lower,
                           public_key=public_key)
    step = report["details"].get("source")
    engine = report["details"].get("engine")
    line = (f"validate {artifact}: {'PASS' if report['passed'] else 'FAIL'} {report['task']} agreement "
            f"{report['agreement']:.4f} over {report['units']} {report['unit']}, max |diff| {report['max_abs_diff']:.3g}"
            + (f"; vs {source.name}: agreement {step['agreement']:.4f}" if step and source else "")
            + ("" if report["passed"] else "; " + "; ".join(report["failures"]))
            + ("" if not engine or engine["host_code"] else f"\n  engine deserialized without host code: {engine['why']}"))
    finish(report["passed"], report, line, quiet, as_json)
