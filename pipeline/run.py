"""run_recipe: every stage of a recipe, in order, into one release folder.

The folder is built under a temporary name beside `out` and renamed into place at the end, so
a crash or a bad input never leaves a half-written release. A failed gate does not stop the run:
every artifact is still written, validated and recorded, and `RunOutcome.passed` is False.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from calibration.encode import load_tokenizer
from pipeline import data as datamod
from pipeline import targets
from pipeline.artifacts import Artifact, StageResult, atomic_dir, check_output_dir
from pipeline.compare import ParityReport
from pipeline.errors import RecipeError
from pipeline.manifest import (
    ArtifactRecord, DataRecord, Manifest, ModelRecord, StageRecord, TargetRecord, folder_sha256,
    tool_versions, write_json,
)
from pipeline.model import inspect_model
from pipeline.progress import Progress
from pipeline.recipe import Recipe
from pipeline.report import write_reports
from pipeline.runners import OrtRunner, TorchRunner
from pipeline.stages import export, prune, quantize, validate
from pipeline.stages.build import BuildUnavailable
from pipeline.tasks import METRICS, collect


@dataclass
class RunOutcome:
    out: Path
    manifest: Manifest
    results: list[StageResult]

    @property
    def passed(self) -> bool:
        return self.manifest.passed


def run_recipe(recipe: Recipe, out: Path, progress: Progress = Progress(), overwrite: bool = False,
               target_names: tuple[str, ...] = ()) -> RunOutcome:
    """Export, quantize, make TensorRT-ready ONNX and validate as the recipe says; build engines
    where this machine can; write artifacts, manifest and reports.

    `target_names` restricts the run to those targets (one job per target when fanned out).
    """
    check_output_dir(out, overwrite)
    selected = targets.select_targets(recipe, target_names)
    if recipe.stages.build.require_engines:
        try:
            targets.engines_possible(selected)  # fail before any work, not after ten minutes
        except BuildUnavailable as missing:
            raise BuildUnavailable(f"{missing} (stages.build.require_engines is set; --set "
                                   "stages.build.require_engines=false makes the rest without engines)") from None
    info = inspect_model(recipe.model.path, recipe.model.task)
    task = info.task(recipe.model.max_answer_tokens, recipe.thresholds.min_cosine)
    metric = gated_metric(recipe, task.name)
    tokenizer = load_tokenizer(recipe.model.path, task.name)
    prepared = datamod.prepare(recipe.data, tokenizer, info.label2id, task.name)
    id2label = info.id2label
    evaluation = prepared.evaluation
    results: list[StageResult] = []
    parity: dict[str, ParityReport] = {}

    with atomic_dir(out, overwrite) as work:
        reference = TorchRunner(recipe.model.path, task=task.name)
        with progress.task("PyTorch reference", total=len(evaluation.rows)) as advance:
            reference_outputs = collect(reference, evaluation.batches, task, advance)

        spec = recipe.stages.export
        gate_rows = max(1, spec.validation_samples // recipe.data.batch_size)
        with progress.task("export (Optimum) + check vs PyTorch"):
            exported = export.run(recipe.model.path, work / "model.onnx", spec,
                                  evaluation.batches[:gate_rows], reference, task)
        results.append(exported)
        fp32 = exported.artifacts[0]
        artifacts: list[Artifact] = [fp32]

        dense = fp32
        if recipe.stages.prune.enabled:
            def agreement_of(path: Path) -> float:
                outputs = collect(OrtRunner(path), evaluation.batches, task)
                return task.agreement_rate(reference_outputs, outputs, evaluation.batches)

            with progress.task("prune (FFN neurons, attention heads)"):
                result = prune.run(fp32, recipe.stages.prune, work / "model.pruned.onnx",
                                   prepared.calibration_batches, info.config, agreement_of)
            results.append(result)
            artifacts.extend(result.artifacts)
            dense = result.artifacts[0]

        qdq = None
        if recipe.stages.quantize.enabled:
            for fmt in recipe.stages.quantize.formats:
                with progress.task(f"quantize INT8 ({fmt})"):
                    result = quantize.run(dense, recipe.stages.quantize, fmt,
                                          work / f"model.int8.{fmt}.onnx", prepared.calibration_batches, task)
                results.append(result)
                artifacts.extend(result.artifacts)
                qdq = result.artifacts[0] if fmt == "qdq" else qdq

        with progress.task("TensorRT-ready ONNX per target"):
            target_onnx, typed_results = targets.typed_artifacts(selected, dense, qdq, work)
        results.extend(typed_results)
        artifacts.extend(a for r in typed_results for a in r.artifacts)

        def validate_artifact(artifact: Artifact) -> None:
            with progress.task(f"validate {artifact.name}", total=len(evaluation.rows)) as advance:
                result, report = validate.run(
                    artifact, reference_outputs, evaluation, recipe.gate_for(gate_kind(artifact)),
                    metric, id2label, task, advance,
                )
            results.append(result)
            parity[artifact.name] = report

        for artifact in artifacts:
            validate_artifact(artifact)

        target_records = []
        for target in selected:
            onnx = target_onnx[target.name]
            with progress.task(f"TensorRT readiness ({target.name})"):
                readiness, result = targets.check_readiness(target, onnx, recipe.stages.build.trt_version)
            results.append(result)
            with progress.task(f"engine ({target.name}, {target.arch})"):
                engine, record, result = targets.try_build(target, onnx, work)
            results.append(result)
            if engine is not None:
                artifacts.append(engine)
                validate_artifact(engine)
            target_records.append(TargetRecord(
                name=target.name, arch=target.arch, precision=target.precision,
                onnx=str(onnx.path.relative_to(work)), readiness=readiness.to_dict(),
                engine_status=result.details["status"], engine_reason=result.details.get("reason", ""),
                engine=record and {**record, "path": str(engine.path.relative_to(work))},
                target=json.loads(target.model_dump_json()),
            ))

        manifest = _manifest(recipe, info, prepared, results, artifacts, parity, work, target_records)
        write_json(work / "manifest.json", json.loads(manifest.model_dump_json()))
        write_reports(manifest, work)
    return RunOutcome(out=Path(out), manifest=manifest, results=results)


def gated_metric(recipe: Recipe, task: str) -> str | None:
    """The label metric whose drop is gated: the recipe's, which must fit the task, or the task's
    default; None without labels or for embeddings."""
    allowed = METRICS[task]
    chosen = recipe.thresholds.metric
    if chosen is not None and chosen not in allowed:
        raise RecipeError(f"thresholds.metric {chosen!r} does not apply to {task}; use one of: "
                          f"{', '.join(allowed) or 'none (remove it)'}")
    if recipe.data.label_column is None or not allowed:
        return None
    return chosen or allowed[0]


def gate_kind(artifact: Artifact) -> str:
    """Which recipe thresholds apply: float models made from the pruned one take the pruned gate
    (pruning, not precision, dominates their error); INT8 ones always take the INT8 gate."""
    pruned = artifact.stage == "prune" or artifact.options.get("pruned", False)
    return "pruned" if pruned and artifact.precision != "int8" else artifact.precision


def _manifest(recipe, info, prepared, results, artifacts, parity, work: Path, target_records) -> Manifest:
    export_ok = {r.stage: r.passed for r in results}
    records = []
    for artifact in artifacts:
        report = parity.get(artifact.name)
        passed = report is not None and report.passed and (artifact.stage != "export" or export_ok.get("export", False))
        records.append(ArtifactRecord(
            name=artifact.name, path=str(artifact.path.relative_to(work)), format=artifact.format,
            precision=artifact.precision, sha256=artifact.sha256, size_bytes=artifact.size_bytes,
            stage=artifact.stage, options=artifact.options,
            parity=report.to_dict() if report is not None else None, passed=passed,
        ))
    evaluation = prepared.evaluation
    return Manifest(
        recipe_name=recipe.name,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        passed=all(r.passed for r in results),
        model=ModelRecord(path=str(info.path), sha256=folder_sha256(info.path),
                          model_type=info.model_type, num_labels=info.num_labels, task=info.task_name),
        data={
            "calibration": DataRecord(source=str(prepared.calibration_source),
                                      rows=len(prepared.calibration_rows),
                                      fingerprint=prepared.calibration_fingerprint),
            "evaluation": DataRecord(source=str(evaluation.source), rows=len(evaluation.rows),
                                     fingerprint=evaluation.fingerprint),
        },
        tools=tool_versions(),
        stages=[StageRecord(stage=r.stage, passed=r.passed, message=r.message,
                            seconds=round(r.seconds, 3), details=r.details) for r in results],
        artifacts=records,
        targets=target_records,
        recipe=json.loads(recipe.model_dump_json()),
    )

