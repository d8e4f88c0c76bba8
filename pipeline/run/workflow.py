"""run_recipe: every stage of a recipe, in order, into one release folder.

The folder is built under a temporary name beside `out` and renamed into place at the end, so
a crash, a kill or a bad input never leaves a half-written release; a lock (`pipeline.run.lock`)
keeps a second run out meanwhile. A failed gate does not stop the run: every artifact is still
written, validated and recorded, and `RunOutcome.passed` is False. Stages whose inputs are
unchanged are copied from the content-addressed cache (`pipeline.run.cache`), and the manifest says
which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.artifacts import (
    Artifact,
    StageResult,
    atomic_dir,
    check_output_dir,
)
from pipeline.families import family_of
from pipeline.parity.runners import torch_device
from pipeline.parity.timing import at_length
from pipeline.progress import SILENT, Progress
from pipeline.recipe import Recipe, RecoverSpec
from pipeline.release import serving
from pipeline.release.manifest import (
    ArtifactRecord,
    DataRecord,
    InvocationRecord,
    Manifest,
    ModelRecord,
    StageRecord,
    TargetRecord,
    tool_versions,
)
from pipeline.release.signing import load_signing_key, write_release
from pipeline.run import searches, targets
from pipeline.run.cache import CachedStages, StageCache
from pipeline.run.context import RunInputs
from pipeline.run.lock import release_lock
from pipeline.run.speed import CPU_INT8, speed_gate
from pipeline.stages import export, prune, quantize, trt_onnx
from pipeline.stages.build import BuildUnavailable
from pipeline.stages.prune import recover as recover_stage


@dataclass
class RunOutcome:
    out: Path
    manifest: Manifest
    results: list[StageResult]

    @property
    def passed(self) -> bool:
        return self.manifest.passed


@dataclass(frozen=True)
class RunOptions:
    """How a run behaves, as opposed to what it makes (the recipe). `command` is what the manifest
    records as the invocation: the CLI passes its command line."""

    overwrite: bool = False
    target_names: tuple[str, ...] = ()
    cache: StageCache = field(default_factory=lambda: StageCache(None))
    wait: bool = False  # for a live run holding the release folder
    command: tuple[str, ...] = ()
    sign_key: Path | None = None
    build_engines: bool = True  # False: phase one of a two-phase release (shipyard engines builds them)


def run_recipe(recipe: Recipe, out: Path, progress: Progress = SILENT, options: RunOptions | None = None
               ) -> RunOutcome:
    """Export, quantize, make TensorRT-ready ONNX and validate as the recipe says; build engines
    where this machine can; write artifacts, manifest and reports.

    `options.target_names` restricts the run to those targets (one job per target when fanned
    out). The release folder is locked for the run; finished stages come from `options.cache`.
    """
    options = options or RunOptions()
    check_output_dir(out, options.overwrite)
    selected = targets.select_targets(recipe, options.target_names)
    if recipe.stages.build.require_engines and options.build_engines:
        try:
            targets.engines_possible(selected)  # fail before any work, not after ten minutes
        except BuildUnavailable as missing:
            raise BuildUnavailable(f"{missing} (stages.build.require_engines is set; --set "
                                   "stages.build.require_engines=false makes the rest without engines)") from None
    if options.sign_key is not None:
        load_signing_key(options.sign_key)  # a bad key fails now, not after the run
    with release_lock(out, options.wait):
        outcome = _run_locked(recipe, Path(out), progress, options, selected)
    if recipe.stages.package.triton:  # from the release as written and verified, like shipyard package
        from pipeline.release.triton import package, repository_path

        with progress.task("Triton model repository"):
            package(outcome.out, repository_path(outcome.out), options.overwrite, recipe.stages.package.python_runtime)
    return outcome


def _run_locked(recipe: Recipe, out: Path, progress: Progress, options: RunOptions,
                selected: list) -> RunOutcome:
    check_output_dir(out, options.overwrite)  # again: a run we waited for may have written it
    inputs = RunInputs.of(recipe)
    info, model_sha, task = inputs.info, inputs.model_sha, inputs.task
    prepared = inputs.prepared
    evaluation = prepared.evaluation
    seen = prepared.seen_digests
    results: list[StageResult] = []
    parity: dict[str, dict] = {}
    source_parity: dict[str, dict | None] = {}
    cache = options.cache

    with atomic_dir(out, options.overwrite) as work:
        stages = CachedStages(cache, work)
        torch_reference = inputs.gating.torch
        reference_outputs = inputs.gating.reference_outputs(cache, progress)

        spec = recipe.stages.export
        gate_batches = evaluation.batches[:max(1, spec.validation_samples // recipe.data.batch_size)]
        with progress.task("export (Optimum) + check vs PyTorch"):
            exported, _ = stages.call("export", export.run, recipe.model.path, work / "model.onnx", spec, gate_batches,
                                      torch_reference, task)
        results.append(exported)
        fp32 = exported.artifacts[0]
        artifacts: list[Artifact] = [fp32]

        dense = fp32
        if recipe.stages.prune.enabled:
            pruned_results, dense = prune_stages(inputs, fp32, stages, work, progress)
            results.extend(pruned_results)
            artifacts.append(dense)

        qdq = None
        if recipe.stages.quantize.enabled:
            for fmt in recipe.stages.quantize.formats:
                with progress.task(f"quantize INT8 ({fmt})"):
                    result, _ = stages.call(f"quantize[{fmt}]", quantize.run, dense, recipe.stages.quantize, fmt,
                                            work / quantize.file_name(fmt), prepared.calibration.batches,
                                            prepared.tuning.batches, task, seen)
                results.append(result)
                artifacts.extend(result.artifacts)
                qdq = result.artifacts[0] if fmt == "qdq" else qdq

        target_onnx: dict[str, Artifact] = {}
        with progress.task("TensorRT-ready ONNX per target"):
            for variant, source, names in targets.typed_sources(selected, dense, qdq):
                typed = source
                if variant.converts:
                    made, _ = stages.call(f"trt-onnx[{variant.name}]", trt_onnx.run, variant, source, work, names,
                                          family_of(inputs.info.config).float32_scores)
                    results.append(made)
                    artifacts.extend(made.artifacts)
                    typed = made.artifacts[0]
                target_onnx.update(dict.fromkeys(names, typed))

        # Artifacts converted from a pruned graph are also gated against it (`pipeline.parity.policy.gates_for`).
        source_outputs = inputs.gating.source_outputs(dense, cache, progress) if dense.from_pruned else None

        def validate_artifact(artifact: Artifact) -> None:
            converted = source_outputs if artifact not in (fp32, dense) else None
            stage_results, parity[artifact.name], source_parity[artifact.name] = inputs.gating.validate(
                artifact, stages, reference_outputs, progress, converted)
            results.extend(stage_results)

        for artifact in artifacts:
            validate_artifact(artifact)
        cpu_int8 = [a for a in artifacts if a.name in CPU_INT8]
        cpu_form = None
        if cpu_int8:  # never cached: this machine, now
            with progress.task(f"speed gate ({', '.join(a.name for a in cpu_int8)} vs {dense.name})"):
                timed, cpu_form = speed_gate(cpu_int8, dense, recipe.thresholds.int8,
                                              at_length(prepared.calibration.batches[0], recipe.data.max_length))
            results.extend(timed)
            for artifact, result in zip(cpu_int8, timed, strict=False):
                if result.details["kept_float"]:
                    for path in artifact.files():
                        path.unlink()
                    artifacts.remove(artifact)
                    parity.pop(artifact.name, None)
                    source_parity.pop(artifact.name, None)

        target_records = []
        for target in selected:
            onnx = target_onnx[target.name]
            record, stage_results, engine = target_stages(target, onnx, str(onnx.path.relative_to(work)), work,
                                                          progress, options.build_engines)
            results.extend(stage_results)
            if engine is not None:
                artifacts.append(engine)
                validate_artifact(engine)
            target_records.append(record)

        serving.write(work, recipe.model.path, serving_record(inputs))
        invocation = InvocationRecord.now(list(options.command), cache)
        manifest = _manifest(recipe, info, model_sha, prepared, results, artifacts, parity, source_parity, work,
                             target_records, invocation)
        manifest.cpu_form = cpu_form
        manifest = write_release(manifest, work, options.sign_key)
    return RunOutcome(out=Path(out), manifest=manifest, results=results)


LENGTH_EDGES = [0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def token_lengths(batches: list) -> dict:
    """Tokens per row of tokenized batches (what the report draws against the target profiles)."""
    import numpy as np

    lengths = np.concatenate([b["attention_mask"].sum(axis=1) for b in batches]) if batches else np.zeros(0)
    return {"edges": LENGTH_EDGES, "counts": np.histogram(lengths, LENGTH_EDGES)[0].tolist(),
            "max": int(lengths.max()) if lengths.size else 0}


def serving_record(inputs: RunInputs) -> serving.ServingRecord:
    """How the gate encoded the evaluation rows and read the outputs, for a server (`pipeline.release.serving`)."""
    recipe, task = inputs.recipe, inputs.task
    kind = task.spec.kind
    return serving.ServingRecord(
        task=task.name, id2label=inputs.info.id2label if kind in ("class", "tag") else {},
        max_length=recipe.data.max_length, padding=recipe.data.padding,
        truncation="only_second" if kind == "span" else "longest_first", batch_size=recipe.data.batch_size,
        order_by_length=recipe.data.padding == "longest",
        text_pair=kind == "span" or recipe.data.text_pair_column is not None,
        pooling=serving.Pooling(mode=task.pooling.mode, normalize=task.pooling.normalize) if kind == "embedding" else None,
        max_answer_tokens=task.max_answer_tokens if kind == "span" else None,
        min_cosine=task.min_cosine if kind == "embedding" else None)


def prune_stages(inputs: RunInputs, fp32: Artifact, stages: CachedStages, work: Path, progress: Progress
                 ) -> tuple[list[StageResult], Artifact]:
    """Prune the FP32 graph, then, when the recipe says so, recover it by distillation.

    Returns the stage results and the artifact the later stages build from: the pruned graph, or
    the recovered one, in which case the unrecovered graph is an intermediate and is removed from
    the release (its plan and config stay: they describe the recovered model's structure)."""
    recipe, prepared, task = inputs.recipe, inputs.prepared, inputs.task
    spec = recipe.stages.prune
    seen = prepared.seen_digests
    tuning = prepared.tuning.batches
    recovery = inputs.recovery
    # The prune stage does not read stages.prune.recover: a change there re-runs recovery only.
    prune_spec = spec.model_copy(update={"recover": RecoverSpec()})
    out = work / "model.pruned.onnx"
    with progress.task("prune (FFN neurons, attention heads)"):
        if spec.budget is None:  # scored on the calibration rows, and those are all it saw
            pruned, _ = stages.call("prune", prune.run, fp32, prune_spec, out, prepared.calibration.batches,
                                    inputs.info.config, sorted(set(prepared.calibration.digests)))
        else:
            trial_recovery = recovery if spec.budget.recovered else None
            settings = {"reference": recipe.model.path, "max_length": recipe.data.max_length,
                        "opset": recipe.stages.export.opset, "device": torch_device(recipe.model.device)
                        } if trial_recovery else None
            pruned, _ = stages.call("prune", searches.prune_within_budget, fp32, prune_spec, out,
                                    prepared.calibration.batches, tuning, inputs.info.config, task, seen,
                                    trial_recovery, settings, progress=progress)
    if recovery is None:
        return [pruned], pruned.artifacts[0]
    source = pruned.artifacts[0]
    recovered, _ = stages.call("recover", recover_stage.run, recipe.model.path, source, recovery.data,
                               work / "model.recovered.onnx", recovery.spec, recipe.data.max_length, task.name,
                               recipe.stages.export.opset, tuple(seen), progress=progress,
                               allow_pickle=recipe.model.allow_pickle, device=torch_device(recipe.model.device))
    for path in source.files():
        path.unlink()
    return [pruned, recovered], recovered.artifacts[0]


def target_stages(target, onnx: Artifact, onnx_path: str, work: Path, progress: Progress, build_engines: bool = True
                  ) -> tuple[TargetRecord, list[StageResult], Artifact | None]:
    """Readiness of the target's typed ONNX against its TensorRT, then its engine where this machine
    can build it (`targets.try_build`); the record the manifest keeps of the target."""
    with progress.task(f"TensorRT readiness ({target.name})"):
        readiness, checked = targets.check_readiness(target, onnx)
    with progress.task(f"engine ({target.name}, {target.arch})"):
        engine, record, built = targets.try_build(target, onnx, work, readiness, build_engines)
    return TargetRecord(
        name=target.name, arch=target.arch, precision=target.precision, onnx=onnx_path,
        readiness={**readiness.to_dict(), "path": onnx_path}, engine_status=built.details["status"],
        engine_reason=built.details.get("reason", ""),
        engine=None if record is None or engine is None else {**record, "path": str(engine.path.relative_to(work))},
        target=json.loads(target.model_dump_json()),
    ), [checked, built], engine


def _manifest(recipe, info, model_sha, prepared, results, artifacts, parity, source_parity, work: Path,
              target_records, invocation) -> Manifest:
    export_ok = {r.stage: r.passed for r in results}
    records = []
    for artifact in artifacts:
        report = parity.get(artifact.name)
        passed = report is not None and report["passed"] and (artifact.stage != "export" or export_ok.get("export", False))
        records.append(ArtifactRecord.of(artifact, work, report, passed, source_parity.get(artifact.name)))
    evaluation = prepared.evaluation
    recovered = next((r for r in results if r.stage == "recover"), None)
    return Manifest(
        recipe_name=recipe.name,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        passed=all(r.passed for r in results),
        model=ModelRecord(path=str(info.path), sha256=model_sha, model_type=info.model_type,
                          num_labels=info.num_labels, task=info.task_name, device=torch_device(recipe.model.device)),
        data={
            "calibration": DataRecord(source=str(prepared.calibration.source), rows=len(prepared.calibration.rows),
                                      fingerprint=prepared.calibration.fingerprint,
                                      token_lengths=token_lengths(prepared.calibration.batches)),
            "tuning": DataRecord(source=str(prepared.tuning.source), rows=len(prepared.tuning.rows),
                                 fingerprint=prepared.tuning.fingerprint,
                                 token_lengths=token_lengths(prepared.tuning.batches)),
            "evaluation": DataRecord(source=str(evaluation.source), rows=len(evaluation.rows),
                                     fingerprint=evaluation.fingerprint, token_lengths=token_lengths(evaluation.batches)),
            **({"training": DataRecord(source=str(recipe.data.training.path),
                                       rows=recovered.details["recovery"]["training_rows"],
                                       fingerprint=recovered.details["recovery"]["training_fingerprint"])}
               if recovered is not None else {}),
        },
        tools=tool_versions(),
        stages=[StageRecord.of(r) for r in results],
        artifacts=records,
        targets=target_records,
        recipe=json.loads(recipe.model_dump_json()),
        invocation=invocation,
    )
