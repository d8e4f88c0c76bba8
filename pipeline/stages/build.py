"""TensorRT engine builds, on the documented `tensorrt` Python API.

Split so that everything but the build itself is checked on CPU:

- `plan_build(target, onnx)`: what the builder will be told (profiles per graph input, memory pool,
  optimization level, flags set and cleared, hardware compatibility, DLA), a pure function of the
  recipe and graph: fp32 targets clear TF32 (on by default on sm_80+, it would miss the fp32 gate);
  DLA targets have static profiles (the recipe refuses others) and ask the parser to adjust for DLA;
- `build_environment()`: which TensorRT and which GPU this machine has, or a `BuildUnavailable`
  error saying what is missing and where builds run (the Docker image on a GPU host);
- `check_target_arch(target, env)`: refuses a build whose engine would not run on the target
  (another architecture, or another TensorRT than the target's `trt_version`);
- `build_engine(plan, out)`: parse with `OnnxParser`, add the profiles, configure, attach the
  timing cache (`attach_timing_cache`: a cache from another device or TensorRT is replaced by an
  empty one, not fatal), `build_serialized_network`, deserialize once as the postcondition, then
  save the timing cache if the builder kept one (`save_timing_cache`). A parser or builder failure
  raises `EngineBuildFailed`, which a run records as a failed stage (exit 1) while keeping every
  CPU artifact.

The network is created strongly typed (precision comes from the graph; see `trt_onnx.py`), so no
FP16/INT8 builder flags are set: TensorRT 11 removed them. Other flags are looked up defensively
(`builder_flag`: a TensorRT without one exits 2 naming it). After the build the engine inspector's
per-layer JSON must show the precision the target asked (`pipeline.trt.inspect`), and the record
keeps TensorRT, CUDA, driver, GPU and compute capability, so an engine is never reused elsewhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_file, sha256_file
from pipeline.errors import ShipyardError
from pipeline.graph import model as graph_model
from pipeline.recipe import TargetSpec

# What this machine has for builds, re-exported: the run and the standalone build reach them (and
# tests replace them) through this module.
from pipeline.trt.host import BuildEnvironment as BuildEnvironment
from pipeline.trt.host import BuildUnavailable as BuildUnavailable
from pipeline.trt.host import build_environment as build_environment
from pipeline.trt.host import check_target_arch as check_target_arch
from pipeline.trt.inspect import precision_check


class EngineBuildFailed(ShipyardError):
    """TensorRT's parser or builder refused a graph the readiness check passed: the engine failed,
    not the input, so a run records it as a failed stage and keeps its other artifacts."""

    exit_code = 1


@dataclass
class BuildPlan:
    """Everything `build_engine` sets on the builder, decided before TensorRT is imported."""

    target: str
    arch: str
    onnx: str
    profiles: list[dict[str, list[list[int]]]]  # per profile: input -> [min, opt, max] shapes
    workspace_bytes: int
    optimization_level: int
    hardware_compatibility: str
    flags: list[str] = field(default_factory=list)
    clear_flags: list[str] = field(default_factory=list)
    parser_flags: list[str] = field(default_factory=list)
    dla_core: int | None = None
    timing_cache: str | None = None
    trt_version: str = ""
    precision: str = ""  # what the target asked: the inspector check after the build holds the engine to it
    rebuild_check: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_build(target: TargetSpec, onnx_path: Path) -> BuildPlan:
    """The builder configuration for `target`; every graph input gets [batch, sequence] shapes."""
    inputs = graph_model.input_names(onnx_path)
    profiles = []
    for profile in target.profiles:
        shapes = [[profile.batch.min, profile.sequence.min], [profile.batch.opt, profile.sequence.opt],
                  [profile.batch.max, profile.sequence.max]]
        profiles.append({name: shapes for name in inputs})
    flags = []
    if target.version_compatible:
        flags.append("VERSION_COMPATIBLE")
    if target.sparse_weights:
        flags.append("SPARSE_WEIGHTS")
    # TF32 is on by default for float32 layers on sm_80+; an fp32 target is gated at agreement 1.0
    # and 1e-3 against PyTorch's float32, which TF32's 10-bit mantissa misses.
    clear_flags = ["TF32"] if target.precision == "fp32" else []
    parser_flags = []
    if target.dla_core is not None:
        flags.append("GPU_FALLBACK")  # BERT's Gather/Softmax/LayerNorm layers do not all run on the DLA
        parser_flags.append("ADJUST_FOR_DLA")
        dynamic = [i for i, p in enumerate(target.profiles)
                   if not (p.batch.min == p.batch.max and p.sequence.min == p.sequence.max)]
        if dynamic:  # the recipe refuses these; a hand-made TargetSpec must not slip through
            raise ShipyardError(f"target {target.name}: DLA needs static profiles (min = opt = max); profile "
                                f"{dynamic[0]} is dynamic, so every layer would fall back to the GPU")
    return BuildPlan(
        target=target.name, arch=target.arch, onnx=str(onnx_path), profiles=profiles,
        workspace_bytes=target.workspace_mb << 20, optimization_level=target.optimization_level,
        hardware_compatibility=target.hardware_compatibility.upper(), flags=flags, clear_flags=clear_flags,
        parser_flags=parser_flags, dla_core=target.dla_core,
        timing_cache=str(target.timing_cache) if target.timing_cache else None, trt_version=target.tensorrt,
        precision=target.precision, rebuild_check=target.rebuild_check,
    )


@dataclass
class EngineRecord:
    """What the manifest records of a built engine."""

    path: str
    sha256: str
    size_bytes: int
    trt_version: str
    gpu_name: str
    compute_capability: str
    build_seconds: float
    plan: dict[str, Any]
    timing_cache: str = "none"
    cuda: str = ""
    driver: str = ""
    # What the engine inspector says its float layers run in (`pipeline.trt.inspect`).
    precision_check: dict[str, Any] = field(default_factory=dict)
    # With rebuild_check: whether a second build with the same timing cache gave the same bytes.
    rebuild: dict[str, Any] = field(default_factory=dict)


def attach_timing_cache(config, path: Path | None) -> str:
    """Give the builder the timing cache at `path` (or an empty one); returns what happened.

    `set_timing_cache` refuses a cache made on another device or TensorRT (it returns False with
    ignore_mismatch=False); that costs build time, not correctness, so an empty cache replaces it
    and the file is overwritten with this device's cache after the build."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
        return "loaded" if data else ("new" if path is not None else "none")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        return "unavailable: the builder refused an empty timing cache"
    return "mismatch: the cache came from another device or TensorRT; started empty"


def save_timing_cache(config, path: Path | None, status: str) -> str:
    """Write the builder's timing cache to `path` atomically, if it kept one; returns the status."""
    if path is None:
        return status
    cache = config.get_timing_cache()
    data = cache.serialize() if cache is not None else None
    if data is None or len(bytes(data)) == 0:
        return f"{status}; not saved: the builder kept no timing cache"
    with atomic_file(path) as tmp:
        tmp.write_bytes(bytes(data))
    return f"{status}; saved"


def build_engine(plan: BuildPlan, out: Path, env: BuildEnvironment) -> EngineRecord:
    """Build, serialize and re-load the engine for `plan`; writes `out` atomically."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # TensorRT 11: always strongly typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    for flag in plan.parser_flags:
        if hasattr(trt.OnnxParserFlag, flag):
            parser.set_flag(getattr(trt.OnnxParserFlag, flag))
    if not parser.parse_from_file(plan.onnx):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f" at node {first.node_name()!r} ({first.node_operator()})" if first is not None else ""
        raise EngineBuildFailed(f"TensorRT {env.trt_version} could not parse {plan.onnx}{where}: "
                                f"{first.desc() if first is not None else 'unknown error'}; the readiness check "
                                "passed it, so please report the graph")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.optimization_level
    if plan.hardware_compatibility == "AMPERE_PLUS":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    for flag in plan.flags:
        config.set_flag(builder_flag(trt, flag, env.trt_version, plan.target))
    for flag in plan.clear_flags:
        if hasattr(trt.BuilderFlag, flag):  # a flag to clear that this TensorRT lacks is already off
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    # Per-layer types in the inspector's JSON: the postcondition below reads them.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    for shapes in plan.profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    cache_path = Path(plan.timing_cache) if plan.timing_cache else None
    cache_status = attach_timing_cache(config, cache_path)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise EngineBuildFailed(f"TensorRT {env.trt_version} failed to build target {plan.target} from {plan.onnx}; "
                                "its log above names the layer")

    runtime = trt.Runtime(logger)
    if "VERSION_COMPATIBLE" in plan.flags:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    if engine is None:  # the postcondition: it loads
        raise EngineBuildFailed(f"the engine built for target {plan.target} does not deserialize; not writing it")
    inspector = engine.create_engine_inspector()
    check = precision_check(json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)),
                            plan.precision)
    if not check.passed:  # and it runs in the precision asked (TensorRT 11 can silently build another)
        raise EngineBuildFailed(f"target {plan.target} (TensorRT {env.trt_version}): {check.message}")
    with atomic_file(out) as tmp:
        tmp.write_bytes(bytes(serialized))
    cache_status = save_timing_cache(config, cache_path, cache_status)
    rebuild = rebuild_record(bytes(serialized), builder.build_serialized_network(network, config)) \
        if plan.rebuild_check else {}
    return EngineRecord(
        path=str(out), sha256=sha256_file(out), size_bytes=Path(out).stat().st_size,
        trt_version=env.trt_version, gpu_name=env.gpu_name, compute_capability=env.arch,
        build_seconds=round(seconds, 3), plan=plan.to_dict(), timing_cache=cache_status, cuda=env.cuda,
        driver=env.driver, precision_check=check.to_dict(), rebuild=rebuild,
    )


def rebuild_record(first: bytes, second) -> dict[str, Any]:
    """Whether a rebuild (same network, config and, now warm, timing cache) gave the same engine.
    TensorRT does not promise byte-identical rebuilds (tactic timing can differ); Shipyard's
    guarantee is instead that the engine shipped is the one hashed and gated, never a rebuild."""
    import hashlib

    digests = [hashlib.sha256(first).hexdigest(), hashlib.sha256(bytes(second)).hexdigest() if second else None]
    same = digests[0] == digests[1]
    return {"identical": same, "sha256": digests,
            "note": "same bytes" if same else "the rebuild differs; the engine shipped is the first, hashed and gated"}


def builder_flag(trt, name: str, version: str, target: str):
    """`trt.BuilderFlag.<name>`, or exit 2 naming the flag when this TensorRT has none (TensorRT
    11 removed the precision flags and others): nothing is built half-configured."""
    if not hasattr(trt.BuilderFlag, name):
        raise ShipyardError(f"target {target}: TensorRT {version} has no builder flag {name}; drop the setting that "
                            "asks for it (version_compatible, sparse_weights, dla_core) or build with a TensorRT "
                            "that has it")
    return getattr(trt.BuilderFlag, name)
