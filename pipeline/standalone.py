"""The stages on plain paths, for `shipyard export|quantize|validate` and release scripts."""

from __future__ import annotations

import json
from pathlib import Path

from calibration.encode import Encoder, load_tokenizer
from calibration.sampling import Columns
from pipeline import data as datamod
from pipeline.artifacts import Artifact, StageResult, check_writable_parent
from pipeline.compare import ParityReport
from pipeline.errors import ArtifactError, ShipyardError
from pipeline.manifest import write_json
from pipeline.model import inspect_model
from pipeline.progress import Progress
from pipeline.readiness import check_model_file
from pipeline.recipe import (
    ARCHITECTURES, TRT_VERSION, ExportSpec, Gate, ProfileSpec, PruneSpec, QuantizeSpec, Range, TargetSpec,
    Thresholds, load_recipe,
)
from pipeline.runners import ENGINE_SUFFIXES, TorchRunner, check_onnx_file
from pipeline.stages import build, export, prune, quantize, validate
from pipeline.tasks import METRICS, Pooling, Task, collect, graph_task

# Real sentences of different lengths (some past 64 tokens) for the export gate when no data is
# given: they exercise the dynamic batch and sequence axes the way production traffic does.
PROBE_TEXTS = [
    "Great product, arrived on time.",
    "I would not recommend this to anyone; the battery died after two days and support never answered.",
    "meh",
    "The self-driving car stopped politely at every crossing, which honestly surprised me.",
    "Terrible. Just terrible.",
    "Quarterly revenue rose 4% while operating costs stayed flat, according to the filing released on "
    "Tuesday, although analysts cautioned that currency effects flattered the headline number and that "
    "the guidance for the next two quarters remained unusually vague compared to previous years.",
    "Is this the right place to ask about refunds?",
    "Love it!!! 😍",
]


def export_and_check(model_dir: Path, out: Path, task: str | None, opset: int, atol: float,
                     progress: Progress = Progress()) -> StageResult:
    """Export for `task` (default: the model head's task) and gate the outputs on probe sentences."""
    info = inspect_model(model_dir, task)
    tokenizer = load_tokenizer(model_dir)
    check_writable_parent(out)
    encoder = Encoder(tokenizer, Columns(), max_length=128, padding="longest")
    rows = [{"text": t} for t in PROBE_TEXTS]
    batches = [encoder.encode(rows[:5]), encoder.encode(rows[5:6]), encoder.encode(rows[6:])]
    with progress.task("export (Optimum) + check vs PyTorch"):
        return export.run(model_dir, out, ExportSpec(opset=opset, atol=atol), batches,
                          TorchRunner(model_dir, task=info.task_name), info.task())


def calibration_batches(calibration: Path, tokenizer_dir: Path, text_column: str,
                        text_pair_column: str | None, samples: int, max_length: int,
                        task: str = "text-classification") -> list:
    """A seeded sample of calibration rows, tokenized to max_length for `task`, in batches of 32."""
    columns = Columns(text_column, text_pair_column)
    rows = datamod.load_sample(calibration, columns, samples, 0, "calibration")
    encoder = Encoder(load_tokenizer(tokenizer_dir, task), columns, max_length, "max_length", task)
    return list(encoder.batches(rows, 32))


def graph_task_of(model_path: Path, tokenizer_dir: Path | None) -> Task:
    """The task of an exported graph (from its outputs), with the pooling of its model folder."""
    import onnx

    name = graph_task(onnx.load(str(model_path), load_external_data=False))
    if name is None:
        raise ShipyardError(f"ONNX file {model_path}: outputs are not Optimum's (logits, start_logits/end_logits or "
                            "last_hidden_state); export it with shipyard export")
    pooling = Pooling.of(tokenizer_dir) if name == "feature-extraction" and tokenizer_dir else Pooling()
    return Task(name, pooling)


def quantize_file(model_path: Path, out: Path, fmt: str, method: str, calibration: Path | None,
                  tokenizer_dir: Path | None, text_column: str, text_pair_column: str | None,
                  samples: int, max_length: int, progress: Progress = Progress()) -> StageResult:
    check_onnx_file(model_path)
    check_writable_parent(out)
    if calibration is None or tokenizer_dir is None:
        raise ShipyardError(
            "quantize needs --calibration DATA and --tokenizer DIR (activation scales and the "
            "float-fallback check are measured on them)"
        )
    task = graph_task_of(model_path, tokenizer_dir)
    batches = calibration_batches(calibration, tokenizer_dir, text_column, text_pair_column, samples, max_length,
                                  task.name)
    source = Artifact(name="model.fp32", path=model_path, format="onnx", precision="fp32", stage="input")
    with progress.task(f"quantize INT8 ({fmt})"):
        return quantize.run(source, QuantizeSpec(formats=[fmt], method=method), fmt, out, batches, task)


def _parse_heads(heads_json: str | None) -> dict[int, list[int]] | None:
    if heads_json is None:
        return None
    try:
        raw = json.loads(heads_json)
        return {int(layer): [int(h) for h in heads] for layer, heads in raw.items()}
    except (ValueError, TypeError, AttributeError):
        raise ShipyardError(
            f"--prune-heads {heads_json!r}: expected JSON like '{{\"0\": [1, 2], \"2\": [0]}}'"
        ) from None


def prune_file(model_path: Path, out: Path, calibration: Path | None, tokenizer_dir: Path | None,
               text_column: str, text_pair_column: str | None, samples: int, max_length: int,
               ffn_fraction: float, ffn_scope: str, heads_per_layer: int, heads_json: str | None,
               sparsity_24: str, compensate: bool = True, progress: Progress = Progress()) -> StageResult:
    check_onnx_file(model_path)
    check_writable_parent(out)
    spec = PruneSpec(enabled=True, ffn_fraction=ffn_fraction, ffn_scope=ffn_scope,
                     heads_per_layer=heads_per_layer, heads=_parse_heads(heads_json), sparsity_24=sparsity_24,
                     compensate=compensate)
    batches = []
    if ffn_fraction > 0 or heads_per_layer > 0:
        if calibration is None or tokenizer_dir is None:
            raise ShipyardError("--ffn and --heads-per-layer score on data: pass --calibration DATA --tokenizer DIR")
        batches = calibration_batches(calibration, tokenizer_dir, text_column, text_pair_column,
                                      samples, max_length)
    config_file = tokenizer_dir / "config.json" if tokenizer_dir else None
    config = json.loads(config_file.read_text()) if config_file and config_file.is_file() else {}
    source = Artifact(name="model.fp32", path=model_path, format="onnx", precision="fp32", stage="input")
    with progress.task("prune (FFN neurons, attention heads)"):
        return prune.run(source, spec, out, batches, config)


def artifact_kind(path: Path) -> tuple[str, str]:
    """(precision, threshold kind) of an artifact: 'int8' when the graph quantizes anything,
    'fp16' when its weights are float16, 'pruned' for a float graph the prune stage marked,
    else 'fp32'. An engine's come from the build record `shipyard build` wrote beside it."""
    import onnx

    if Path(path).suffix in ENGINE_SUFFIXES:
        record = _engine_record(path)
        precision = record["precision"]
        return precision, "pruned" if record.get("pruned") and precision != "int8" else precision
    quantized = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "QAttention"}
    model = onnx.load(str(path), load_external_data=False)
    if any(n.op_type in quantized for n in model.graph.node):
        return "int8", "int8"
    precision = "fp16" if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer) else "fp32"
    pruned = any(p.key == prune.PRUNED_MARK for p in model.metadata_props)
    return precision, "pruned" if pruned else precision


def _engine_record(engine: Path) -> dict:
    sidecar = Path(f"{engine}.json")
    if not Path(engine).is_file():
        raise ArtifactError(f"engine {engine} not found; build it with shipyard build")
    if not sidecar.is_file():
        raise ArtifactError(f"engine {engine} has no build record {sidecar.name}; build it with shipyard build, "
                            "which writes one")
    return json.loads(sidecar.read_text())


DEFAULT_PROFILE = ProfileSpec(batch=Range(min=1, opt=8, max=32), sequence=Range(min=1, opt=128, max=512))


def _resolve_target(ref: str, recipe_file: Path | None, model_path: Path) -> tuple[TargetSpec, str]:
    """A recipe's target by name, or an architecture with the graph's precision and default profiles."""
    if recipe_file is not None:
        recipe = load_recipe(recipe_file)
        return recipe.target(ref), recipe.stages.build.trt_version
    if ref not in ARCHITECTURES:
        raise ShipyardError(f"--target {ref}: pass --recipe to use a recipe target, or an architecture "
                            f"({', '.join(ARCHITECTURES)})")
    precision, _ = artifact_kind(model_path)
    return TargetSpec(name=ref, arch=ref, precision=precision, profiles=[DEFAULT_PROFILE]), TRT_VERSION


def build_file(model_path: Path, target_ref: str, out: Path, recipe_file: Path | None = None):
    """Build one engine; returns (record, None), or (None, readiness report) when the graph is not ready.

    Bad input and a machine that cannot build raise `ShipyardError` before any work."""
    check_onnx_file(model_path)
    check_writable_parent(out)
    target, trt_version = _resolve_target(target_ref, recipe_file, model_path)
    env = build.build_environment()
    build.check_target_arch(target, env)
    readiness = check_model_file(model_path, trt_version, target.profiles)
    if not readiness:
        return None, readiness
    record = build.build_engine(build.plan_build(target, model_path), out, env)
    precision, kind = artifact_kind(model_path)
    write_json(Path(f"{out}.json"), {**vars(record), "precision": precision, "pruned": kind == "pruned",
                                     "target": json.loads(target.model_dump_json()),
                                     "readiness": readiness.to_dict()})
    return record, None


def validate_file(reference: Path, artifact: Path, data: Path, text_column: str,
                  text_pair_column: str | None, label_column: str | None, samples: int | None,
                  max_length: int, min_agreement: float | None, max_abs_diff: float | None,
                  max_metric_drop: float | None, metric: str | None, report_path: Path | None,
                  progress: Progress = Progress(), task: str | None = None, max_answer_tokens: int = 30,
                  min_cosine: float = 0.99) -> ParityReport:
    info = inspect_model(reference, task)
    spec = info.task(max_answer_tokens, min_cosine)
    allowed = METRICS[spec.name]
    if metric is not None and metric not in allowed:
        raise ShipyardError(f"--metric {metric} does not apply to {spec.name}; use one of: "
                            f"{', '.join(allowed) or 'none (embeddings have no labels)'}")
    if Path(artifact).suffix not in ENGINE_SUFFIXES:
        check_onnx_file(artifact)
    if report_path is not None:
        check_writable_parent(report_path)
    columns = Columns(text_column, text_pair_column, label_column)
    rows = datamod.load_sample(data, columns, samples, 0, "evaluation")
    encoder = Encoder(load_tokenizer(reference, spec.name), columns, max_length, "max_length", spec.name)
    evaluation = datamod.make_eval_set(data, rows, encoder, 32, info.label2id)
    precision, kind = artifact_kind(artifact)
    default = getattr(Thresholds(), kind)
    labelled = label_column is not None and bool(allowed)
    gate = Gate(
        min_agreement=default.min_agreement if min_agreement is None else min_agreement,
        max_abs_diff=default.max_abs_diff if max_abs_diff is None else max_abs_diff,
        max_metric_drop=(default.max_metric_drop if labelled else None)
        if max_metric_drop is None else max_metric_drop,
    )
    with progress.task("PyTorch reference", total=len(rows)) as advance:
        reference_outputs = collect(TorchRunner(reference, task=spec.name), evaluation.batches, spec, advance)
    target = Artifact(name=artifact.name, path=artifact, format="onnx", precision=precision, stage="input")
    with progress.task(f"validate {artifact.name}", total=len(rows)) as advance:
        _, report = validate.run(target, reference_outputs, evaluation, gate,
                                 (metric or allowed[0]) if labelled else None, info.id2label, spec, advance)
    if report_path is not None:
        write_json(report_path, report.to_dict())
    return report
