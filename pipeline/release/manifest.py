"""The release manifest: what was made, from what, with which tools, and whether it passed.

The pydantic models below are the manifest's schema (committed as recipes/manifest.schema.json).
Every artifact path is relative to the release folder and `shipyard verify` re-hashes them: a
manifest never lists a file that is not there with that hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.artifacts import sha256_file
from pipeline.runtimes import ArtifactFormat

MANIFEST_VERSION = 3  # 3: `files` lists every file of the release
# Every library that shapes an artifact's bytes or a figure in the manifest.
TOOLS = ("bert-shipyard", "torch", "transformers", "tokenizers", "safetensors", "optimum", "optimum-onnx", "onnx",
         "onnxruntime", "onnxslim", "numpy", "pyarrow", "datasets", "tensorrt")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRecord(_Strict):
    path: str
    sha256: str = Field(description="sha256 over the folder's file names and contents")
    model_type: str
    num_labels: int
    task: str
    device: str | None = Field(None, description="where PyTorch ran it: the reference outputs and recovery (cpu, "
                               "cuda); outputs on another device agree within the gates, not bit for bit")


class DataRecord(_Strict):
    source: str
    rows: int
    fingerprint: str = Field(description="sha256 of the selected rows, in order")
    token_lengths: dict[str, Any] = Field(
        default_factory=dict, description="tokens per row as encoded: histogram edges and counts, and the longest")


class StageRecord(_Strict):
    stage: str
    passed: bool
    message: str
    seconds: float
    details: dict[str, Any] = Field(default_factory=dict)
    cached: bool = Field(False, description="reused from the stage cache; seconds are the original run's")

    @classmethod
    def of(cls, result) -> StageRecord:
        """The record of a `pipeline.artifacts.StageResult`."""
        return cls(stage=result.stage, passed=result.passed, message=result.message,
                   seconds=round(result.seconds, 3), details=result.details, cached=result.cached)


class ArtifactRecord(_Strict):
    name: str
    path: str = Field(description="relative to the release folder")
    format: ArtifactFormat = Field(description="its runtime's entry (pipeline/runtimes.py): what runs and checks it")
    precision: str
    sha256: str
    size_bytes: int = Field(description="the file's size, with its companion files")
    external_data: dict[str, str] = Field(
        default_factory=dict, description="its companion files (beside it, by name) and their sha256, verified with "
        "it: a graph's external data past protobuf's 2 GB limit, an OpenVINO IR's weights (.bin)")
    stage: str
    kind: str = Field(description="fp32, pruned, fp16 or int8: which thresholds gate it")
    from_pruned: bool = Field(False, description="a pruned or recovered graph is this artifact or in its ancestry "
                              "(then it is also gated against that graph)")
    options: dict[str, Any]
    parity: dict[str, Any] | None = Field(None, description="ParityReport against PyTorch")
    source_parity: dict[str, Any] | None = Field(
        None, description="ParityReport against the pruned FP32 graph the artifact was converted from, with its "
        "precision's gate (artifacts made from a pruned model); its 'reference' names that graph")
    passed: bool = Field(description="every gate of the artifact passed")

    @classmethod
    def of(cls, artifact, folder: Path, parity: dict[str, Any] | None, passed: bool,
           source_parity: dict[str, Any] | None = None) -> ArtifactRecord:
        """The record of a `pipeline.artifacts.Artifact` written under `folder`; `passed` is the
        verdict of the other gates and is ANDed with `source_parity`'s."""
        passed = passed and (source_parity is None or bool(source_parity["passed"]))
        return cls(name=artifact.name, path=str(artifact.path.relative_to(folder)), format=artifact.format,
                   precision=artifact.precision, sha256=artifact.sha256, size_bytes=artifact.size_bytes,
                   external_data=artifact.external_data, from_pruned=artifact.from_pruned, stage=artifact.stage,
                   kind=artifact.kind, options=artifact.options, parity=parity,
                   source_parity=source_parity, passed=passed)


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


class MachineRecord(_Strict):
    platform: str
    cpu: str
    cpu_features: str = Field("", description="architecture and the CPU features ONNX Runtime's kernels choose by "
                              "(also in the stage cache's key), e.g. 'x86_64:avx,avx2,f16c,fma'")
    cores: int
    gpu: str | None = None
    gpu_driver: str | None = None


class InvocationRecord(_Strict):
    command: list[str] = Field(description="the exact command line")
    cwd: str
    machine: MachineRecord
    cache: dict[str, Any] = Field(description="enabled, folder, stages reused, entries found damaged, size cap (bytes), "
                                  "entries evicted to stay under it")

    @classmethod
    def now(cls, command: list[str], cache) -> InvocationRecord:
        """This process: its command line, folder, machine and use of `cache` (a StageCache)."""
        import os

        return cls(command=list(command), cwd=os.getcwd(), machine=machine(), cache={
            "enabled": cache.enabled, "folder": str(cache.root) if cache.root else None,
            "reused": list(cache.hits), "damaged_and_recomputed": list(cache.damaged),
            "max_size": cache.max_size, "evicted": len(cache.evicted)})


class FileRecord(_Strict):
    sha256: str
    role: str = Field(description="artifact, external-data, plan, config, recovered-model, tokenizer, serving, report, "
                                  "junit or file")


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
    cpu_form: dict[str, Any] | None = Field(
        None, description="the release's CPU form: the fastest CPU artifact the run measured on its machine (what "
        "shipyard predict runs), every CPU INT8 artifact's speed-up over its float source, the CPU and the threads")
    collected_from: list[str] = Field(default_factory=list, description="folders merged by shipyard collect")
    release: dict[str, str] | None = Field(
        None, description="an engine folder (shipyard engines): the release folder it was built from and the "
        "sha256 of that release's manifest.json")
    recipe: dict[str, Any] = Field(description="the resolved recipe; rerun it with shipyard run")
    invocation: InvocationRecord | None = None
    files: dict[str, FileRecord] = Field(
        default_factory=dict, description="every file of the release but manifest.json and its signature, by path "
        "relative to the folder: shipyard verify refuses any other file, and the signature covers the list")

    def artifact_files(self) -> dict[str, str]:
        """Path -> role of the artifacts' own files: each graph or engine and its external data."""
        files = {}
        for artifact in self.artifacts:
            files[artifact.path] = "artifact"
            for name in artifact.external_data:
                files[str(Path(artifact.path).parent / name)] = "external-data"
        return files


# Written after the file list is made, so not in it.
UNLISTED = ("manifest.json", "manifest.json.sig")


def file_role(relative: str, manifest: Manifest) -> str:
    """What a release file is, for the manifest's `files`."""
    name = Path(relative).name
    if relative in (own := manifest.artifact_files()):
        return own[relative]
    if any(part.endswith(".model") for part in Path(relative).parts[:-1]):
        return "recovered-model"
    if name.endswith(".plan.json"):
        return "plan"
    if name.endswith(".config.json"):
        return "config"
    if Path(relative).parts[0] == "tokenizer":
        return "tokenizer"
    return {"report.md": "report", "report.html": "report", "junit.xml": "junit",
            "serving.json": "serving"}.get(relative, "file")


def list_files(manifest: Manifest, folder: Path) -> Manifest:
    """`manifest` with `files` set to every file under `folder` (but manifest.json and its
    signature), each with its sha256 and role."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = str(path.relative_to(folder))
        if relative not in UNLISTED:
            files[relative] = FileRecord(sha256=sha256_file(path), role=file_role(relative, manifest))
    return manifest.model_copy(update={"files": files})


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


# The CPU features ONNX Runtime's MLAS kernels (and torch's) choose their code paths by: an
# entry calibrated or exported on an AVX-512 VNNI machine has other bytes than one made on AVX2.
KERNEL_CPU_FEATURES = frozenset({
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512dq",
    "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2", "sme"})


@functools.cache
def cpu_kernel_features() -> str:
    """The machine's architecture and which of KERNEL_CPU_FEATURES its CPU has (Linux's
    /proc/cpuinfo "flags" or "Features"), e.g. "x86_64:avx,avx2,f16c,fma"."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:  # not Linux: the architecture alone
        pass
    return f"{platform.machine()}:{','.join(sorted(flags & KERNEL_CPU_FEATURES))}"


def machine() -> MachineRecord:
    """CPU model and cores, and the GPU and driver where one is present (without importing torch)."""
    import os

    from pipeline.trt.host import nvidia_gpu

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu, driver = nvidia_gpu()
    return MachineRecord(platform=platform.platform(), cpu=cpu, cpu_features=cpu_kernel_features(),
                         cores=os.cpu_count() or 0, gpu=gpu, gpu_driver=driver)


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


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
