"""Releases past one machine: the jobs of a release (`plan`) and one manifest from their folders (`collect`).

An engine runs only on the GPU architecture (and TensorRT) it was built with, so a release runs
in two phases (`plan_release`, `plan_jobs`):

1. one CPU job, `shipyard run RECIPE --out release --no-engines`, makes every shared artifact once (ONNX, INT8,
   the typed ONNX of every target) and gates them;
2. one job per target, on a runner of its GPU, `shipyard engines release --target NAME --out
   engines/NAME` (`pipeline.run.phase_two`), builds and gates that target's engine from the release.

`collect release engines/*` merges them. The single-machine path, `run --target`, still works:
`collect` also merges per-target run folders, and refuses when their shared artifacts' hashes
differ, because then the jobs did not ship the same model.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_dir, check_output_dir, sha256_file
from pipeline.errors import ShipyardError
from pipeline.platforms import ARCHITECTURES, JETSON_ARCHS, PLATFORMS
from pipeline.recipe import Recipe
from pipeline.release.manifest import ArtifactRecord, Manifest, TargetRecord
from pipeline.release.signing import VerifiedRelease, read_verified, write_release

GENERATED = ("manifest.json", "manifest.json.sig", "report.md", "junit.xml")  # made anew for the merge


RELEASE_DIR = "release"
ENGINES_DIR = "engines"


def plan_release(recipe_path: str, release_dir: str = RELEASE_DIR) -> dict[str, Any]:
    """Phase one: the CPU job that makes and gates every shared artifact once."""
    return {"phase": "release", "runs_on": ["ubuntu-latest"], "out": release_dir,
            "command": shlex.join(["shipyard", "run", recipe_path, "--out", release_dir, "--no-engines"])}


def plan_jobs(recipe: Recipe, release_dir: str = RELEASE_DIR) -> list[dict[str, Any]]:
    """Phase two: one job per target, where it must run and the command that builds and gates its
    engine from the release folder."""
    jobs = []
    for target in recipe.targets:
        jetson = target.arch in JETSON_ARCHS
        out = f"{ENGINES_DIR}/{target.name}"
        jobs.append({
            "phase": "engines", "target": target.name, "arch": target.arch, "gpu": ARCHITECTURES[target.arch],
            "precision": target.precision, "trt_version": target.tensorrt,
            # A platform preset's runner labels (pipeline/platforms.py), else the architecture's.
            "runs_on": list(PLATFORMS[target.platform].runner) if target.platform else
            ["self-hosted", "jetson" if jetson else "gpu", target.arch],
            # Jetson runs JetPack's own TensorRT (aarch64); every other target, the image of its
            # TensorRT line (the Dockerfile's TRT build argument: any TRT_RELEASES row).
            "container": "" if jetson else f"shipyard-trt:{target.tensorrt}",
            "out": out,
            "command": shlex.join(["shipyard", "engines", release_dir, "--target", target.name, "--out", out]),
        })
    return jobs


def plan_collect(release_dir: str = RELEASE_DIR, out: str = "shipped") -> dict[str, Any]:
    """After both phases: one folder, one manifest, every target with its engine."""
    return {"phase": "collect", "out": out,
            "command": f"shipyard collect {release_dir} {ENGINES_DIR}/* --out {out} --require-engines"}


def github_matrix(jobs: list[dict[str, Any]]) -> str:
    """`{"include": [...]}` on one line, for `echo "matrix=..." >> $GITHUB_OUTPUT`."""
    return json.dumps({"include": jobs}, separators=(",", ":"))


def _verified(folder: Path) -> VerifiedRelease:
    """A folder to merge, verified once (`read_verified`): what collect reads of it is the manifest
    it verified, and what it copies is checked against that manifest again."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ShipyardError(f"{folder}: no manifest.json; pass release folders written by shipyard run")
    verified = read_verified(folder)
    if verified.manifest is None:
        raise ShipyardError(f"{path}: not a Shipyard manifest (schema recipes/manifest.schema.json)")
    if verified.problems:
        raise ShipyardError(f"{folder}: {verified.problems[0]}; the folder changed after shipyard run wrote it")
    return verified


def _check_engine_folders(folders: list[Path], verified: list[VerifiedRelease]) -> None:
    """Engine folders (`shipyard engines`) merge only with the release they were built from."""
    releases = {v.manifest_sha256: f for f, v in zip(folders, verified, strict=True) if v.intact().release is None}
    for folder, manifest in zip(folders, (v.intact() for v in verified), strict=True):
        if manifest.release is None:
            continue
        if manifest.release["manifest_sha256"] not in releases:
            raise ShipyardError(f"{folder}: built from release {manifest.release['path']} (manifest sha256 "
                                f"{manifest.release['manifest_sha256'][:12]}), which is not among the folders given; "
                                "pass that release folder first")


def collect(folders: list[Path], out: Path, overwrite: bool = False, require_engines: bool = False) -> Manifest:
    """Merge per-target release folders into `out`; shared artifacts must have equal hashes."""
    if not folders:
        raise ShipyardError("collect needs at least one release folder")
    check_output_dir(out, overwrite)
    verified = [_verified(f) for f in folders]
    manifests = [v.intact() for v in verified]
    _check_engine_folders(folders, verified)
    base = next((i for i, m in enumerate(manifests) if m.release is None), 0)
    first, first_folder = manifests[base], folders[base]
    for folder, manifest in zip(folders, manifests, strict=True):
        if (manifest.recipe_name, manifest.model.sha256) != (first.recipe_name, first.model.sha256):
            raise ShipyardError(f"{folder}: recipe {manifest.recipe_name!r} / model {manifest.model.sha256[:12]} "
                                f"differ from {first_folder}'s; collect folders of one release only")
        for split, record in manifest.data.items():
            if record.fingerprint != first.data[split].fingerprint:
                raise ShipyardError(f"{folder}: {split} rows differ from {first_folder}'s (fingerprint); "
                                    "every job must use the same recipe and data")

    artifacts: dict[str, ArtifactRecord] = {}
    owner: dict[str, Path] = {}
    for folder, manifest in zip(folders, manifests, strict=True):
        for record in manifest.artifacts:
            seen = artifacts.get(record.path)
            if seen is not None and seen.sha256 != record.sha256:
                raise ShipyardError(
                    f"{record.path}: sha256 {seen.sha256[:12]} in {owner[record.path]} but {record.sha256[:12]} in "
                    f"{folder}; the jobs did not produce the same artifact, so they are not one release")
            if seen is None:
                artifacts[record.path], owner[record.path] = record, folder
    targets: dict[str, TargetRecord] = {}
    for folder, manifest in zip(folders, manifests, strict=True):
        for target in manifest.targets:
            if target.name in targets and targets[target.name].engine and target.engine:
                raise ShipyardError(f"target {target.name} has an engine in two folders ({folder}); collect each target once")
            if target.name not in targets or target.engine:
                targets[target.name] = target
    missing = [t.name for t in targets.values() if t.engine is None]
    if require_engines and missing:
        raise ShipyardError(f"targets without an engine: {', '.join(missing)}; run their jobs on GPU hosts "
                            "(shipyard plan) or drop --require-engines")

    stages, seen_stages = [], set()
    for manifest in manifests:
        for stage in manifest.stages:
            key = (stage.stage, stage.message)
            if key not in seen_stages:
                seen_stages.add(key)
                stages.append(stage)
    merged = first.model_copy(update={
        "passed": all(m.passed for m in manifests), "stages": stages,
        "artifacts": list(artifacts.values()), "targets": list(targets.values()),
        "collected_from": [str(Path(f).resolve()) for f in folders], "release": None,
    })
    with atomic_dir(out, overwrite) as work:
        for folder, manifest in zip(folders, manifests, strict=True):  # only what each manifest lists (verified)
            for relative in manifest.files:
                if relative not in GENERATED and not (work / relative).exists():
                    (work / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(Path(folder) / relative, work / relative)
                    if sha256_file(work / relative) != manifest.files[relative].sha256:
                        raise ShipyardError(f"{Path(folder) / relative} changed after {folder} was verified "
                                            "(sha256 differs from its manifest); nothing was written: collect again")
        merged = write_release(merged, work)
    return merged
