"""The stages on plain paths, for `shipyard export|quantize|prune|validate|build` and release scripts.

They apply `pipeline.parity.policy`, as `run` does: the same gates per kind of artifact, the same
seeded sampling, and rows an artifact was calibrated or tuned on (recorded inside it) are left
out of a later `validate` sample, so one file can serve both commands without leaking."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, cast

from calibration.encode import Encoder, load_tokenizer
from calibration.sampling import Columns, Side, disjoint_splits, row_digest
from pipeline.artifacts import (
    Artifact,
    StageResult,
    atomic_file,
    check_output_file,
    check_writable_parent,
    made_parents,
    replace_dir,
    sha256_file,
)
from pipeline.errors import ArtifactError, OutputError, ShipyardError
from pipeline.graph import model as graph_model
from pipeline.inputs import data as datamod
from pipeline.inputs.model import check_max_length, inspect_model
from pipeline.names import Precision, QuantFormat
from pipeline.parity.engine import ENGINE_SUFFIXES
from pipeline.parity.policy import (
    PRUNED_MARK,
    STANDALONE_BATCH,
    STANDALONE_SEED,
    calibration_padding,
    gate_for,
    gated_metric,
    graph_kind,
    kind_of,
    recorded_kind,
    seen_rows,
)
from pipeline.parity.runners import (
    FILE_CHECKS,
    TorchRunner,
    check_onnx_file,
    torch_device,
)
from pipeline.parity.tasks import Pooling, Task, graph_task
from pipeline.progress import SILENT, Progress
from pipeline.recipe import (
    ExportSpec,
    FallbackSpec,
    Gate,
    PruneSpec,
    QuantizeSpec,
    Thresholds,
)
from pipeline.recipe.defaults import schema_default
from pipeline.release.manifest import folder_sha256, write_json
from pipeline.release.signing import engine_trust
from pipeline.run.cache import CachedStages, StageCache
from pipeline.run.gating import Gating
from pipeline.runtimes import format_of_path, require
from pipeline.stages import export, prune, quantize
from pipeline.tasks import task_spec

Batch = dict[str, Any]
P = ParamSpec("P")

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


def one_stage(stage: str, out: Path, overwrite: bool, cache: StageCache | None, fn: Callable[P, StageResult],
              *args: P.args, **kwargs: P.kwargs) -> StageResult:
    """`fn(*args)` as a run calls it, through the stage cache (`CachedStages.call`), writing into a
    private folder beside `out` whose outputs are then moved into place. `OUT` in `args` stands for
    the stage's output path in that folder, so the key does not depend on where `out` lies.

    One rule for every standalone command, as for `run`'s release folder: an output that exists
    (`out`, or a file or folder the stage writes beside it) is replaced only with `overwrite`.
    Missing folders above `out` are created, and removed again if the stage fails."""
    out = Path(out)
    check_output_file(out, overwrite)
    with made_parents(out), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp)
        called = [work / out.name if a is OUT else a for a in args]
        result, _ = CachedStages(cache or StageCache(None), work).call(stage, fn, *called, **kwargs)  # type: ignore[arg-type]
        moved = {path: out.parent / path.relative_to(work)
                 for path in [f for a in result.artifacts for f in a.files()] + result.files}
        tops = list(dict.fromkeys(path.relative_to(work).parts[0] for path in moved))
        taken = [out.parent / top for top in tops if (out.parent / top).exists()]
        if taken and not overwrite:
            raise OutputError(f"output {taken[0]} already exists (shipyard {stage} writes it beside {out.name}); "
                              "pass --overwrite or choose another --out")
        # Files and whole folders (recover's model folder) replace what is beside `out`.
        for top in tops:
            if (work / top).is_dir():
                replace_dir(work / top, out.parent / top)
            else:
                os.replace(work / top, out.parent / top)
    for artifact in result.artifacts:
        artifact.path = moved[artifact.path]
    result.files = [moved[p] for p in result.files]
    return result


OUT = Path("<the stage's output>")  # stands for the stage's output path in `one_stage`'s arguments


@dataclass(frozen=True)
class GateRows:
    """Where `shipyard export --data` draws the rows its gate runs on."""

    path: Path
    samples: int
    text_column: str = "text"
    text_pair_column: str | None = None
    max_length: int = 128
    encoding: str | None = None


def export_and_check(model_dir: Path, out: Path, task: str | None, opset: int, atol: float,
                     progress: Progress = SILENT, allow_pickle: bool = False,
                     cache: StageCache | None = None, gate_rows: GateRows | None = None,
                     overwrite: bool = False) -> StageResult:
    """Export for `task` (default: the model head's task) and gate the outputs on `gate_rows`
    (seeded, tokenized and batched as a run's evaluation rows) or, without them, on probe sentences."""
    info = inspect_model(model_dir, task, allow_pickle)
    check_output_file(out, overwrite)
    if gate_rows is None:
        # Probe sentences are plain text whatever the task: the graph's inputs are the same.
        encoder = Encoder(load_tokenizer(model_dir, "text"), Columns(), max_length=128, padding="longest", encoding="text")
        rows = [{"text": t} for t in PROBE_TEXTS]
        batches = [encoder.encode(rows[:5]), encoder.encode(rows[5:6]), encoder.encode(rows[6:])]
    else:
        check_max_length(info, gate_rows.max_length, "--max-length")
        columns = Columns(gate_rows.text_column, gate_rows.text_pair_column)
        drawn = datamod.load_sample(gate_rows.path, columns, gate_rows.samples, schema_default("data.seed"),
                                    "export gate", gate_rows.encoding)
        encoding = task_spec(info.task_name).encoding
        encoder = Encoder(load_tokenizer(model_dir, encoding), columns, gate_rows.max_length,
                          schema_default("data.padding"), encoding)
        batches = list(encoder.batches(drawn, schema_default("data.batch_size")))
    with progress.task("export (Optimum) + check vs PyTorch"):
        return one_stage("export", out, overwrite, cache, export.run, model_dir, OUT, ExportSpec(opset=opset, atol=atol), batches,
                         TorchRunner(model_dir, task=info.task_name, allow_pickle=allow_pickle,
                                     device=torch_device("auto")), info.task())


def calibration_batches(calibration: Path, tokenizer_dir: Path, columns: Columns, samples: int,
                        tuning_samples: int, max_length: int, task: str,
                        encoding: str | None = None, method: str = "minmax") -> tuple[list, list, list[str]]:
    """Seeded calibration rows and tuning rows after them (as `run` draws them), tokenized for
    `task` and padded as a recipe with the schema's padding pads them for calibrator `method`
    (`pipeline.parity.policy.calibration_padding`), in batches; and the digests of every row used."""
    raw = datamod.load_rows(calibration, encoding)
    datamod.require_columns(raw, columns.needed(), calibration)
    side = Side(raw, columns, calibration)
    # Evaluation gets nothing here: it is drawn by `validate`, which leaves these rows out.
    splits = disjoint_splits(side, Side([], columns, calibration), samples, tuning_samples, 0, STANDALONE_SEED,
                             "stratified")
    padding = calibration_padding(method, schema_default("data.padding"))
    rows_as = task_spec(task).encoding
    encoder = Encoder(load_tokenizer(tokenizer_dir, rows_as), columns, max_length, padding, rows_as)
    used = [row_digest(columns, r) for r in splits.calibration + splits.tuning]
    return (list(encoder.batches(splits.calibration, STANDALONE_BATCH)),
            list(encoder.batches(splits.tuning, STANDALONE_BATCH)), used)


def graph_task_of(model_path: Path, tokenizer_dir: Path | None) -> Task:
    """The task of an exported graph (from its outputs), with the pooling of its model folder."""
    name = graph_task(graph_model.load(model_path))
    if name is None:
        raise ShipyardError(f"ONNX file {model_path}: outputs are not Optimum's (logits, start_logits/end_logits or "
                            "last_hidden_state); export it with shipyard export")
    pooling = Pooling.of(tokenizer_dir) if task_spec(name).kind == "embedding" and tokenizer_dir else Pooling()
    return Task(name, pooling)


@dataclass(frozen=True)
class CalibrationRows:
    """The rows a standalone `prune` or `quantize` draws (seeded, as a run draws them): the file,
    the model folder whose tokenizer encodes them (and whose config.json prune checks the graph
    against), the columns, how many rows and their length."""

    data: Path | None
    model_dir: Path | None
    columns: Columns
    samples: int
    max_length: int
    encoding: str | None = None


def quantize_file(model_path: Path, out: Path, fmt: QuantFormat, spec: QuantizeSpec, rows: CalibrationRows,
                  tuning_samples: int, progress: Progress = SILENT, cache: StageCache | None = None,
                  overwrite: bool = False) -> StageResult:
    """`spec` (from the CLI's options) for format `fmt`, calibrated on `rows` and `tuning_samples`
    rows after them (0: no float fallback to choose)."""
    check_onnx_file(model_path)
    check_output_file(out, overwrite)
    wanted = quantize.file_name(fmt).rsplit(".", 1)[-1]
    if Path(out).suffix != f".{wanted}":
        raise ShipyardError(f"output {out}: format {fmt} writes a .{wanted} file; name --out like "
                            f"{Path(out).with_suffix('.' + wanted).name}")
    if fmt == "openvino":
        require("openvino", "quantize --format openvino")
    if rows.data is None or rows.model_dir is None:
        raise ShipyardError(
            "quantize needs --calibration DATA and --tokenizer DIR (activation scales and the "
            "float-fallback check are measured on them)"
        )
    task = graph_task_of(model_path, rows.model_dir)
    batches, tuning, used = calibration_batches(rows.data, rows.model_dir, rows.columns, rows.samples, tuning_samples,
                                                rows.max_length, task.name, rows.encoding, spec.method)
    if not tuning:  # --tuning-samples 0 quantizes every node, as its help says: no fallback to choose
        spec = spec.model_copy(update={"fallback": FallbackSpec(max_nodes=0)})
    with progress.task(f"quantize INT8 ({fmt})"):
        return one_stage(f"quantize[{fmt}]", out, overwrite, cache, quantize.run, input_artifact(model_path), spec, fmt, OUT,
                         batches, tuning, task, used)


def input_artifact(path: Path) -> Artifact:
    """An ONNX file given on the command line, with the kind its record (or its graph) says."""
    precision, kind, from_pruned = artifact_kind(path)
    return Artifact(name=Path(path).stem, path=path, format="onnx", precision=precision, stage="input", kind=kind,
                    from_pruned=from_pruned)


def prune_file(model_path: Path, out: Path, spec: PruneSpec, rows: CalibrationRows, progress: Progress = SILENT,
               cache: StageCache | None = None, overwrite: bool = False) -> StageResult:
    """`spec` (from the CLI's options) on the graph at `model_path`, scored on `rows`."""
    check_onnx_file(model_path)
    check_output_file(out, overwrite)
    batches: list[Batch] = []
    used: list[str] = []
    scored = spec.ffn_fraction > 0 or spec.heads_per_layer > 0
    if scored and (rows.data is None or rows.model_dir is None):
        raise ShipyardError("--ffn and --heads-per-layer score on data: pass --calibration DATA --tokenizer DIR")
    # As in a run, the blocks found are checked against the model's config.json (layers, heads,
    # sizes): a graph that is not the model's, or blocks found wrongly, fail here, not after surgery.
    if rows.model_dir is None:
        raise ShipyardError("prune checks the graph's blocks against the model's config.json: pass --tokenizer "
                            "MODEL_DIR, the folder the graph was exported from")
    config = inspect_model(rows.model_dir, None).config
    if scored and rows.data is not None:
        task = graph_task_of(model_path, rows.model_dir)  # a tagger's rows are encoded as words, as it is gated
        batches, _, used = calibration_batches(rows.data, rows.model_dir, rows.columns, rows.samples, 0,
                                               rows.max_length, task.name, rows.encoding)
    with progress.task("prune (FFN neurons, attention heads)"):
        return one_stage("prune", out, overwrite, cache, prune.run, input_artifact(model_path), spec, OUT, batches, config, used)


def artifact_kind(path: Path) -> tuple[Precision, str, bool]:
    """(precision, kind, from_pruned) of an artifact, as the stage that made it recorded them
    (`pipeline.parity.policy`): an ONNX file's in its metadata (the prune mark travels into every
    graph made from a pruned one), an engine's in the build record `shipyard build` wrote beside
    it. An ONNX file Shipyard did not write is classified from its graph."""
    import onnx_ir as ir

    if format_of_path(str(path)) == "openvino":
        from pipeline.stages.quantize.openvino import read_record

        record = read_record(path)
        if "kind" not in record:
            raise ArtifactError(f"OpenVINO IR {path} has no Shipyard record (kind, rows it saw); validate takes the "
                                "IRs shipyard quantize or run wrote")
        return "int8", record["kind"], record.get("pruned") == "True"
    if Path(path).suffix in ENGINE_SUFFIXES:
        record = _engine_record(path)
        built = cast(Precision, record["precision"])
        from_pruned = bool(record.get("pruned", False)) or record.get("kind") == "pruned"
        return built, record.get("kind") or kind_of(built, from_pruned), from_pruned
    model = graph_model.load(path)
    kind = recorded_kind(model) or graph_kind(model)
    fp16 = any(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values())
    precision: Precision = "int8" if kind == "int8" else "fp16" if fp16 else "fp32"
    return precision, kind, PRUNED_MARK in model.metadata_props or kind == "pruned"


def _engine_record(engine: Path) -> dict:
    """The build record `shipyard build` wrote beside `engine`, checked to describe these bytes."""
    sidecar = Path(f"{engine}.json")
    if not Path(engine).is_file():
        raise ArtifactError(f"engine {engine} not found; build it with shipyard build")
    if not sidecar.is_file():
        raise ArtifactError(f"engine {engine} has no build record {sidecar.name}; build it with shipyard build, "
                            "which writes one")
    try:
        record = json.loads(sidecar.read_text())
        precision, sha = record["precision"], record["sha256"]
    except (ValueError, KeyError, TypeError):  # not JSON, or not the record shipyard build writes
        raise ArtifactError(f"engine build record {sidecar} is not one shipyard build wrote (no precision and "
                            "sha256); build the engine again") from None
    if precision not in ("fp32", "fp16", "int8") or sha256_file(engine) != sha:
        raise ArtifactError(f"engine {engine} is not the one its build record {sidecar.name} describes (sha256 "
                            "or precision differs); build it again with shipyard build")
    return record


def validate_file(reference: Path, artifact: Path, data: Path, text_column: str,
                  text_pair_column: str | None, label_column: str | None, samples: int | None,
                  max_length: int, min_agreement: float | None, max_abs_diff: float | None,
                  max_metric_drop: float | None, metric: str | None, report_path: Path | None,
                  progress: Progress = SILENT, task: str | None = None, max_answer_tokens: int = 30,
                  min_cosine: float = 0.99, encoding: str | None = None, allow_pickle: bool = False,
                  source: Path | None = None, cache: StageCache | None = None,
                  min_agreement_lower: float | None = None, public_key: Path | None = None) -> dict[str, Any]:
    """Gate `artifact` against the PyTorch `reference` on rows of `data` it was not calibrated
    or tuned on (the digests recorded inside it), with the policy's gate for its kind, as a run
    gates it (`pipeline.run.gating`, through the stage cache). Returns the parity report.

    With `source`, the pruned FP32 graph the artifact was converted from, the policy's two gates
    apply (`pipeline.parity.policy.gates_for`): the pruned gate against `reference` and the artifact
    precision's gate against `source`, which the explicit thresholds then set; the second's
    report is `details["source"]` and its misses are failures of the one report.

    An engine is deserialized with TensorRT host code only when its verified release records it
    as built version-compatible (`engine_trust`, with `public_key` checking the signature too);
    `details["engine"]` says which and why."""
    info = inspect_model(reference, task, allow_pickle)
    check_max_length(info, max_length, "--max-length")
    spec = info.task(max_answer_tokens, min_cosine)
    labelled = label_column is not None and bool(spec.spec.metrics)
    if max_metric_drop is not None and not labelled:
        raise ShipyardError("--max-metric-drop needs gold labels: pass --label-column (or drop the threshold)")
    chosen_metric = gated_metric(metric, spec.name, labelled, "--metric")
    fmt = format_of_path(str(artifact))
    if fmt == "openvino":
        require("openvino", f"validate of {artifact}")
    if fmt in FILE_CHECKS:
        FILE_CHECKS[fmt](artifact)
    if source is not None:
        check_onnx_file(source)
    if report_path is not None:
        check_writable_parent(report_path)
    columns = Columns(text_column, text_pair_column, label_column)
    seen = frozenset(_seen_rows(artifact))
    rows = datamod.load_sample(data, columns, samples, STANDALONE_SEED, "evaluation", encoding, exclude=seen)
    # Padded as a run pads evaluation rows by default, so the figures are the run's.
    encoder = Encoder(load_tokenizer(reference, spec.spec.encoding), columns, max_length,
                      schema_default("data.padding"), spec.spec.encoding)
    evaluation = datamod.make_eval_set(data, rows, encoder, STANDALONE_BATCH, info.label2id, spec.name)
    trust = engine_trust(artifact, public_key) if Path(artifact).suffix in ENGINE_SUFFIXES else None
    if trust is not None and trust.record is not None:  # the release's record, verified, over a sidecar
        record = trust.record
        precision, kind, from_pruned = cast(Precision, record.precision), record.kind, record.from_pruned
    else:
        precision, kind, from_pruned = artifact_kind(artifact)
    # The artifact's own gate (its precision's against --source, else its kind's) is what the
    # explicit thresholds set; the policy gives every other gate.
    own = precision if source is not None else kind
    default = gate_for(Thresholds(), own, labelled)
    thresholds = Thresholds(**{own: Gate(
        min_agreement=default.min_agreement if min_agreement is None else min_agreement,
        min_agreement_lower=default.min_agreement_lower if min_agreement_lower is None else min_agreement_lower,
        max_abs_diff=default.max_abs_diff if max_abs_diff is None else max_abs_diff,
        max_metric_drop=default.max_metric_drop if max_metric_drop is None else max_metric_drop,
    )})
    gating = Gating(thresholds, evaluation, spec, chosen_metric, labelled, info.id2label,
                    TorchRunner(reference, task=spec.name, allow_pickle=allow_pickle, device=torch_device("auto")), folder_sha256(info.path))
    cache = cache or StageCache(None)
    target = Artifact(name=Path(artifact).stem, path=artifact, format=fmt,
                      precision=precision, stage="input", kind=kind, from_pruned=from_pruned,
                      options={} if trust is None else {"version_compatible": trust.host_code})
    if trust is not None and trust.record is not None and target.sha256 != trust.record.sha256:
        raise ArtifactError(f"engine {artifact} changed after its release was verified (sha256 differs from the "
                            "manifest's); not deserialized: restore the release (shipyard verify) or build it again")
    with tempfile.TemporaryDirectory() as work:
        sources = None if source is None else gating.source_outputs(input_artifact(source), cache, progress)
        _, report, step = gating.validate(target, CachedStages(cache, Path(work)),
                                          gating.reference_outputs(cache, progress), progress, sources)
    report["details"]["left_out_rows_the_artifact_saw"] = len(seen)
    if trust is not None:
        report["details"]["engine"] = {"host_code": trust.host_code, "why": trust.reason}
    if step is not None:
        report["details"]["source"] = {"path": str(source), **step}
        report["failures"] += [f"vs {Path(str(source)).name}: {failure}" for failure in step["failures"]]
        report["passed"] = not report["failures"]
    if report_path is not None:
        with atomic_file(report_path) as tmp:
            write_json(tmp, report)
    return report


def _seen_rows(artifact: Path) -> list[str]:
    """Digests of the rows an ONNX artifact or an IR was calibrated or tuned on (none for engines)."""
    if Path(artifact).suffix in ENGINE_SUFFIXES:
        return []
    if format_of_path(str(artifact)) == "openvino":
        from pipeline.stages.quantize.openvino import read_record

        return [d for d in read_record(artifact).get("seen_rows", "").split(",") if d]
    return seen_rows(graph_model.load(artifact))
