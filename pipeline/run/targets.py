"""The TensorRT part of a run: typed ONNX per target, readiness checks, and engines where possible.

On a machine without TensorRT or a GPU of the target's architecture the engine step is recorded
as "needs a GPU host" and the CPU gates decide the verdict; a recipe with
`stages.build.require_engines` fails up front instead (`engines_possible`).
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.artifacts import Artifact, StageResult
from pipeline.errors import RecipeError
from pipeline.names import BUILD_FAILED, BUILT, DEFERRED, NEEDS_GPU_HOST, NOT_READY
from pipeline.recipe import Recipe, TargetSpec
from pipeline.stages import build, trt_onnx
from pipeline.trt.readiness import ReadinessReport, check_model_file


def select_targets(recipe: Recipe, names: tuple[str, ...]) -> list[TargetSpec]:
    return [recipe.target(n) for n in names] if names else list(recipe.targets)


def engines_possible(targets: list[TargetSpec]) -> None:
    """Raise `BuildUnavailable` unless every target's engine can be built on this machine."""
    if not targets:
        return
    env = build.build_environment()
    for target in targets:
        build.check_target_arch(target, env)


def typed_sources(targets: list[TargetSpec], dense: Artifact, qdq: Artifact | None
                  ) -> list[tuple[trt_onnx.TypedVariant, Artifact, list[str]]]:
    """Which typed graph each target builds from, and what it is made from: one entry per
    distinct variant, with the names of the targets that share it. A pure plan; the run makes
    the variants that convert (`trt_onnx.run`) and takes the others as they are."""
    by_variant: dict[trt_onnx.TypedVariant, list[str]] = {}
    for target in targets:
        by_variant.setdefault(trt_onnx.TypedVariant.of(target), []).append(target.name)
    plan = []
    for variant, names in by_variant.items():
        source = qdq if variant.precision == "int8" else dense
        if source is None:  # the recipe schema refuses int8 targets without the Q/DQ form
            raise RecipeError(f"targets {', '.join(names)}: int8 engines are built from the Q/DQ artifact; "
                              "enable stages.quantize with format qdq")
        plan.append((variant, source, names))
    return plan


def check_readiness(target: TargetSpec, onnx: Artifact) -> tuple[ReadinessReport, StageResult]:
    """The target's graph against the parser of the target's own TensorRT version."""
    started = time.perf_counter()
    report = check_model_file(onnx.path, target.tensorrt, target.profiles, target.precision)
    warned = f", {len(report.warnings)} warnings (first: {report.warnings[0]})" if report.warnings else ""
    message = (f"{onnx.path.name} ready for TensorRT {target.tensorrt} ({report.counts['nodes']} nodes, "
               f"{len(target.profiles)} profiles{warned})" if report.ready else
               f"{len(report.errors)} errors; first: {report.errors[0]}")
    return report, StageResult(stage=f"trt-check[{target.name}]", passed=report.ready, message=message,
                               seconds=time.perf_counter() - started,
                               details={"target": target.name, "onnx": onnx.name})




def try_build(target: TargetSpec, onnx: Artifact, work: Path, readiness: ReadinessReport, build_engines: bool = True
              ) -> tuple[Artifact | None, dict | None, StageResult]:
    """Build the target's engine if its ONNX is ready and this machine can; else say why, without
    failing here (a graph that is not ready already failed its readiness stage). With
    `build_engines` False (phase one of a two-phase release) no engine is attempted."""
    started = time.perf_counter()
    if not build_engines:
        return None, None, StageResult(
            stage=f"build[{target.name}]", passed=True, seconds=0.0,
            message=f"skipped: {DEFERRED} (run --no-engines); shipyard engines RELEASE --target {target.name}",
            details={"target": target.name, "status": DEFERRED, "reason": "run --no-engines"},
        )
    if not readiness.ready:  # the policy shared with `shipyard build`: readiness before any build
        return None, None, StageResult(
            stage=f"build[{target.name}]", passed=True, seconds=0.0,
            message=f"skipped: {NOT_READY} ({readiness.errors[0]})",
            details={"target": target.name, "status": NOT_READY, "reason": str(readiness.errors[0])},
        )
    try:
        env = build.build_environment()
        build.check_target_arch(target, env)
    except build.BuildUnavailable as missing:
        return None, None, StageResult(
            stage=f"build[{target.name}]", passed=True, seconds=time.perf_counter() - started,
            message=f"skipped: {NEEDS_GPU_HOST} ({target.arch}): {missing}",
            details={"target": target.name, "status": NEEDS_GPU_HOST, "reason": str(missing)},
        )
    plan = build.plan_build(target, onnx.path)
    out = work / "engines" / f"{target.name}.engine"
    out.parent.mkdir(exist_ok=True)
    try:
        record = build.build_engine(plan, out, env)
    except build.EngineBuildFailed as failed:  # the engine failed its gate; the CPU artifacts stand
        return None, None, StageResult(
            stage=f"build[{target.name}]", passed=False, seconds=time.perf_counter() - started,
            message=f"failed: {failed}", details={"target": target.name, "status": BUILD_FAILED, "reason": str(failed)},
        )
    artifact = Artifact(name=f"engine.{target.name}", path=out, format="tensorrt-engine",
                        precision=onnx.precision, stage="build", from_pruned=onnx.from_pruned,
                        options={"target": target.name, "arch": target.arch, "source": onnx.name,
                                 "trt_version": record.trt_version, "gpu": record.gpu_name,
                                 "compute_capability": record.compute_capability,
                                 "version_compatible": "VERSION_COMPATIBLE" in plan.flags})
    return artifact, vars(record), StageResult(
        stage=f"build[{target.name}]", artifacts=[artifact], seconds=time.perf_counter() - started,
        message=f"built on {record.gpu_name} ({record.compute_capability}) with TensorRT {record.trt_version} "
                f"in {record.build_seconds:.0f} s, {record.size_bytes / 1e6:.1f} MB",
        details={"target": target.name, "status": BUILT},
    )
