"""`shipyard build` on plain paths: one engine for a recipe target or a bare architecture.

The decisions are `pipeline.stages.build.plan_build`'s; this module resolves the target, checks
the host and the graph before any work, and writes the engine with its build record beside it
under the standalone commands' output rule (`pipeline.run.standalone.one_stage`)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import atomic_file, check_output_file, made_parents
from pipeline.errors import ShipyardError
from pipeline.parity.runners import check_onnx_file
from pipeline.platforms import ARCHITECTURES, shipped_trt_versions
from pipeline.recipe import ProfileSpec, Range, TargetSpec, load_recipe
from pipeline.release.manifest import write_json
from pipeline.run.standalone import artifact_kind
from pipeline.stages import build
from pipeline.trt.readiness import check_model_file

DEFAULT_PROFILE = ProfileSpec(batch=Range(min=1, opt=8, max=32), sequence=Range(min=1, opt=128, max=512))


def _resolve_target(ref: str, recipe_file: Path | None, model_path: Path, env: build.BuildEnvironment) -> TargetSpec:
    """A recipe's target by name, or an architecture with the graph's precision, default profiles and
    this machine's TensorRT (where an operator list ships for it; else the architecture's, which
    `check_target_arch` then refuses naming both)."""
    if recipe_file is not None:
        return load_recipe(recipe_file).target(ref)
    if ref not in ARCHITECTURES:
        raise ShipyardError(f"--target {ref}: pass --recipe to use a recipe target, or an architecture "
                            f"({', '.join(ARCHITECTURES)})")
    precision, _, _ = artifact_kind(model_path)
    local = ".".join(env.trt_version.split(".")[:2])
    return TargetSpec(name=ref, arch=ref, precision=precision, profiles=[DEFAULT_PROFILE],
                      trt_version=local if local in shipped_trt_versions() else None)


def build_file(model_path: Path, target_ref: str, out: Path, recipe_file: Path | None = None,
               overwrite: bool = False):
    """Build one engine; returns (record, None), or (None, readiness report) when the graph is not ready.

    Bad input and a machine that cannot build raise `ShipyardError` before any work. The engine
    and its build record `OUT.json` follow `one_stage`'s rule for existing outputs and new folders."""
    check_onnx_file(model_path)
    sidecar = Path(f"{out}.json")
    check_output_file(out, overwrite)
    check_output_file(sidecar, overwrite)
    if recipe_file is None and target_ref not in ARCHITECTURES:  # bad input first, before what this host lacks
        _resolve_target(target_ref, None, model_path, build.BuildEnvironment("", "", ""))
    env = build.build_environment()
    target = _resolve_target(target_ref, recipe_file, model_path, env)
    build.check_target_arch(target, env)
    readiness = check_model_file(model_path, target.tensorrt, target.profiles, target.precision)
    if not readiness:
        return None, readiness
    with made_parents(out):
        record = build.build_engine(build.plan_build(target, model_path), out, env)
        precision, kind, from_pruned = artifact_kind(model_path)
        with atomic_file(sidecar) as tmp:
            write_json(tmp, {**vars(record), "precision": precision, "kind": kind, "pruned": from_pruned,
                             "target": json.loads(target.model_dump_json()), "readiness": readiness.to_dict()})
    return record, None
