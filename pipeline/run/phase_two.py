"""Phase two of a release: one target's engine, built from a finished release folder on a GPU host.

`shipyard run` (phase one, on any CPU machine) makes the release once: ONNX, INT8, the typed ONNX
of every target and their readiness. `shipyard engines RELEASE --target NAME --out DIR` then runs
on a host of the target's GPU and TensorRT, and only:

1. verifies the release against its manifest (hashes, ONNX loads, schema);
2. checks that the recipe's model and data on this host are the ones the release was made from
   (model folder hash, evaluation-row fingerprint), because the engine is gated against them;
3. checks the target's typed ONNX from the release against the target's TensorRT, and builds the
   engine from that file (no re-export, no re-quantization, so no CPU-dependent bytes change);
4. gates the engine's parity against PyTorch on the recipe's evaluation rows;
5. writes DIR with the engine and a small manifest naming the release it belongs to.

`shipyard collect RELEASE DIR...` merges them. Every shared artifact then comes from one job, so
its bytes cannot differ across x86 and aarch64 runners.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import cast

from pipeline.artifacts import Artifact, atomic_dir, check_output_dir
from pipeline.errors import ShipyardError
from pipeline.names import Precision
from pipeline.progress import SILENT, Progress
from pipeline.recipe import Recipe, parse_recipe
from pipeline.release.fanout import collect
from pipeline.release.manifest import (
    ArtifactRecord,
    InvocationRecord,
    Manifest,
    StageRecord,
)
from pipeline.release.signing import load_signing_key, read_verified, write_release
from pipeline.run.cache import CachedStages, StageCache
from pipeline.run.context import RunInputs
from pipeline.run.lock import release_lock
from pipeline.run.workflow import target_stages
from pipeline.stages import build

# The model and data may live elsewhere on the GPU host; they are checked by hash, so only their
# paths may be changed (any other change would gate the engine differently from the release).
PATH_KEYS = ("model.path", "data.calibration.path", "data.evaluation.path", "data.training.path")


def load_release(release: Path, overrides: tuple[str, ...] = ()) -> tuple[Manifest, str, Recipe]:
    """The release's manifest (as verified, with the sha256 of its bytes) and resolved recipe, after
    checking every file against the manifest."""
    release = Path(release)
    path = release / "manifest.json"
    if not path.is_file():
        raise ShipyardError(f"{release}: no manifest.json; pass a release folder written by shipyard run")
    verified = read_verified(release)
    if verified.problems:
        raise ShipyardError(f"{release}: {verified.problems[0]}; the release changed after shipyard run wrote it "
                            "(shipyard verify lists every problem)")
    manifest = verified.intact()  # parsed from the bytes that were verified, never read again
    for assignment in overrides:
        if assignment.partition("=")[0] not in PATH_KEYS:
            raise ShipyardError(f"--set {assignment}: engines takes only the paths {', '.join(PATH_KEYS)} (the "
                                "release fixes everything else)")
    recipe = parse_recipe(manifest.recipe, f"{path} (recipe)", Path.cwd(), overrides)
    return manifest, verified.manifest_sha256, recipe


def _typed_onnx(manifest: Manifest, release: Path, name: str) -> tuple[Artifact, str]:
    record = next((t for t in manifest.targets if t.name == name), None)
    if record is None:
        made = ", ".join(t.name for t in manifest.targets) or "none"
        raise ShipyardError(f"target {name!r} is not in release {release} (its targets: {made}); run the release "
                            "without --target so that it has every target's ONNX")
    artifact = next((a for a in manifest.artifacts if a.path == record.onnx), None)
    if artifact is None:
        raise ShipyardError(f"{release}: target {name}'s ONNX {record.onnx} is not a listed artifact; re-run the release")
    typed = Artifact(name=artifact.name, path=release / artifact.path, format=artifact.format,
                     precision=cast(Precision, artifact.precision), stage=artifact.stage, options=artifact.options, kind=artifact.kind,
                     from_pruned=artifact.from_pruned)
    return typed, record.onnx


def _pruned_source(manifest: Manifest, release: Path) -> Artifact | None:
    """The release's pruned (or recovered) FP32 graph, which its engines are also gated against
    (`pipeline.parity.policy.gates_for`); None for a release that does not prune."""
    record = next((a for a in manifest.artifacts if a.from_pruned and a.stage in ("prune", "recover")), None)
    if record is None:
        return None
    return Artifact(name=record.name, path=release / record.path, format=record.format, precision=cast(Precision, record.precision),
                    stage=record.stage, options=record.options, sha256=record.sha256, size_bytes=record.size_bytes,
                    kind=record.kind, from_pruned=True)


def build_from_release(release: Path, target_name: str, out: Path, overwrite: bool = False,
                       cache: StageCache | None = None, progress: Progress = SILENT,
                       sign_key: Path | None = None, overrides: tuple[str, ...] = ()) -> Manifest:
    """Build and gate one target's engine from `release` into `out` (module docstring), holding
    `out`'s release lock as `run` does."""
    release = Path(release)
    check_output_dir(out, overwrite)
    with release_lock(out):
        return _build_locked(release, target_name, out, overwrite, cache, progress, sign_key, overrides)


def collect_release(folders: list[Path], out: Path, overwrite: bool = False, require_engines: bool = False) -> Manifest:
    """`pipeline.release.fanout.collect`, holding `out`'s release lock as `run` does: two collects
    (or a collect and a run) into one folder cannot interleave their replace steps."""
    check_output_dir(out, overwrite)
    with release_lock(out):
        return collect(folders, out, overwrite, require_engines)


def _build_locked(release: Path, target_name: str, out: Path, overwrite: bool, cache: StageCache | None,
                  progress: Progress, sign_key: Path | None, overrides: tuple[str, ...]) -> Manifest:
    check_output_dir(out, overwrite)  # again, under the lock: another writer may have just finished it
    manifest, manifest_sha256, recipe = load_release(release, overrides)
    target = recipe.target(target_name)
    typed, onnx_path = _typed_onnx(manifest, release, target_name)
    env = build.build_environment()  # before any work: this host must be able to build the engine
    build.check_target_arch(target, env)
    if sign_key is not None:
        load_signing_key(sign_key)
    inputs = RunInputs.of(recipe, for_engines=True)
    if inputs.model_sha != manifest.model.sha256:
        raise ShipyardError(f"model {recipe.model.path} is not the model release {release} was made from (folder "
                            f"sha256 {inputs.model_sha[:12]}, release {manifest.model.sha256[:12]}); copy that model here")
    fingerprint = inputs.prepared.evaluation.fingerprint
    if fingerprint != manifest.data["evaluation"].fingerprint:
        raise ShipyardError(f"evaluation rows from {recipe.data.evaluation.path} differ from release {release}'s "
                            "(fingerprint); the engine is gated on the same rows: copy that data file here")
    cache = cache or StageCache(None)
    with atomic_dir(out, overwrite) as work:
        record, results, engine = target_stages(target, typed, onnx_path, work, progress)
        artifacts = []
        if engine is not None:
            source = _pruned_source(manifest, release)
            gating = inputs.gating
            gates, parity, source_parity = gating.validate(
                engine, CachedStages(StageCache(None), work), gating.reference_outputs(cache, progress), progress,
                gating.source_outputs(source, cache, progress) if source is not None else None)
            results.extend(gates)
            artifacts.append(ArtifactRecord.of(engine, work, parity, parity["passed"], source_parity))
        small = manifest.model_copy(update={
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "passed": engine is not None and all(r.passed for r in results),
            "stages": [StageRecord.of(r) for r in results], "artifacts": artifacts, "targets": [record],
            "collected_from": [],
            "release": {"path": str(release.resolve()), "manifest_sha256": manifest_sha256},
            "invocation": InvocationRecord.now(sys.argv, cache),
        })
        small = write_release(small, work, sign_key)
    return small


