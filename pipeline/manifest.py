"""The release manifest: what was made, from what, with which tools, and whether it passed.

The pydantic models below are the manifest's schema (committed as recipes/manifest.schema.json).
Every artifact path is relative to the release folder and `verify_release` re-hashes them: a
manifest never lists a file that is not there with that hash.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.artifacts import sha256_file

MANIFEST_VERSION = 1
TOOLS = ("bert-shipyard", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tensorrt")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRecord(_Strict):
    path: str
    sha256: str = Field(description="sha256 over the folder's file names and contents")
    model_type: str
    num_labels: int
    task: str = "text-classification"


class DataRecord(_Strict):
    source: str
    rows: int
    fingerprint: str = Field(description="sha256 of the selected rows, in order")


class StageRecord(_Strict):
    stage: str
    passed: bool
    message: str
    seconds: float
    details: dict[str, Any] = Field(default_factory=dict)


class ArtifactRecord(_Strict):
    name: str
    path: str = Field(description="relative to the release folder")
    format: str
    precision: str
    sha256: str
    size_bytes: int
    stage: str
    options: dict[str, Any]
    parity: dict[str, Any] | None = Field(None, description="ParityReport against PyTorch")
    passed: bool


class TargetRecord(_Strict):
    name: str
    arch: str
    precision: str
    onnx: str = Field(description="the TensorRT-ready ONNX this target builds from, relative path")
    readiness: dict[str, Any] = Field(description="static TensorRT-readiness check of that ONNX")
    engine_status: str = Field(description="'built', or 'needs a GPU host' with the reason")
    engine_reason: str = ""
    engine: dict[str, Any] | None = Field(
        None, description="path, sha256, TensorRT version, GPU, compute capability, build time, plan")
    target: dict[str, Any] = Field(description="the target as the recipe gave it")


class Manifest(_Strict):
    manifest_version: int = MANIFEST_VERSION
    recipe_name: str
    created_at: str
    passed: bool
    model: ModelRecord
    data: dict[str, DataRecord]
    tools: dict[str, str]
    stages: list[StageRecord]
    artifacts: list[ArtifactRecord]
    targets: list[TargetRecord] = Field(default_factory=list)
    collected_from: list[str] = Field(default_factory=list, description="folders merged by shipyard collect")
    recipe: dict[str, Any] = Field(description="the resolved recipe; rerun it with shipyard run")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def folder_sha256(folder: Path) -> str:
    """A content hash of a model folder: its file names and contents, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def manifest_json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Shipyard release manifest"
    return schema


def verify_release(folder: Path) -> list[str]:
    """Problems with a release folder: missing files or hashes that differ from the manifest."""
    folder = Path(folder)
    manifest = Manifest.model_validate_json((folder / "manifest.json").read_text())
    problems = []
    for record in manifest.artifacts:
        path = folder / record.path
        if not path.is_file():
            problems.append(f"{record.path}: listed in the manifest but missing")
        elif sha256_file(path) != record.sha256:
            problems.append(f"{record.path}: sha256 differs from the manifest")
    return problems


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
