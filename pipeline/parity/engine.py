"""Running TensorRT engines (`TrtRunner`, behind the runners' contract of `pipeline.parity.runners`).

An engine serves only the batch and sequence ranges of its optimization profiles: `plan_chunks`
splits a batch over them, `pad_batch` and `trim_output` pad short rows and sequences up to a
profile's minimum and take the answer back; `engine_bytes` reads an engine only while its bytes
are the ones that were hashed and gated. TensorRT and torch (the GPU buffers) load on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError
from pipeline.runtimes import RUNTIMES

Batch = dict[str, np.ndarray]

ENGINE_SUFFIXES = RUNTIMES["tensorrt-engine"].suffixes


@dataclass(frozen=True)
class ProfileRange:
    """The [min, max] batch and sequence an engine's optimization profile accepts."""

    batch: tuple[int, int]
    sequence: tuple[int, int]


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of a batch, fed to `profile` padded to `rows` x `sequence`."""

    profile: int
    start: int
    stop: int
    rows: int
    sequence: int


@dataclass(frozen=True)
class EngineIO:
    """What the runner needs of an engine: its inputs, outputs' dynamic axes and profiles."""

    inputs: list[str]
    outputs: dict[str, tuple[int, ...]]  # name -> shape with -1 for dynamic axes
    profiles: list[ProfileRange]


def describe_engine(engine, input_mode) -> EngineIO:
    """Read an engine's inputs, outputs and profiles (`input_mode` is trt.TensorIOMode.INPUT)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == input_mode]
    outputs = {n: tuple(engine.get_tensor_shape(n)) for n in names if n not in inputs}
    profiles = []
    for index in range(engine.num_optimization_profiles):
        low, _, high = engine.get_tensor_profile_shape(inputs[0], index)
        profiles.append(ProfileRange(batch=(low[0], high[0]), sequence=(low[1], high[1])))
    return EngineIO(inputs, outputs, profiles)


def plan_chunks(profiles: list[ProfileRange], rows: int, sequence: int, engine: str = "engine") -> list[Chunk]:
    """Split a [rows, sequence] batch over the profile that needs the fewest runs, then the least padding.

    A batch larger than a profile's max batch runs in slices; a slice or sequence smaller than a
    profile's minimum is padded (rows repeated, sequence with masked positions) and trimmed after.
    Only a sequence longer than every profile's maximum is refused (recipe validation refuses
    a data.max_length like that up front)."""
    best, best_cost = None, None
    for index, profile in enumerate(profiles):
        (bmin, bmax), (smin, smax) = profile.batch, profile.sequence
        if sequence > smax:
            continue
        fed_sequence = max(sequence, smin)
        chunks = [Chunk(index, start, min(start + bmax, rows), max(min(bmax, rows - start), bmin), fed_sequence)
                  for start in range(0, rows, bmax)]
        padding = sum(c.rows * c.sequence for c in chunks) - rows * sequence
        cost = (len(chunks), padding)
        if best_cost is None or cost < best_cost:
            best, best_cost = chunks, cost
    if best is None:
        longest = max((p.sequence[1] for p in profiles), default=0)
        raise ArtifactError(f"{engine}: sequence length {sequence} is longer than every optimization profile "
                            f"accepts (at most {longest}); add a profile with a larger sequence.max or lower "
                            "data.max_length")
    return best


def pad_batch(batch: Batch, rows: int, sequence: int) -> Batch:
    """Pad [n, s] inputs to [rows, sequence]: extra positions are 0 (masked, attention_mask 0), extra
    rows repeat the last row; their outputs are dropped by `trim_output`."""
    padded = {}
    for name, value in batch.items():
        n, s = value.shape[:2]
        if s < sequence:
            value = np.concatenate([value, np.zeros((n, sequence - s), value.dtype)], axis=1)
        if n < rows:
            value = np.concatenate([value, np.repeat(value[-1:], rows - n, axis=0)], axis=0)
        padded[name] = value
    return padded


def trim_output(value: np.ndarray, shape: tuple[int, ...], rows: int, sequence: int) -> np.ndarray:
    """Drop padded rows, and padded positions on an output whose axis 1 is dynamic (per token)."""
    value = value[:rows]
    if len(shape) >= 2 and shape[1] == -1:
        value = value[:, :sequence]
    return value


class TrtRunner:
    """A serialized TensorRT engine on the first CUDA device; GPU buffers are torch tensors.

    Each batch is split over the optimization profiles (`plan_chunks`): batches larger than a
    profile's max batch run in slices, and rows or sequences shorter than its minimum are padded
    and trimmed, so an engine serves every batch whose sequence fits one of its profiles. It runs on
    a CUDA stream of its own (TensorRT warns about, and synchronises on, the default stream).
    """

    def __init__(self, engine_path: Path, host_code: bool = False, sha256: str | None = None) -> None:
        self.path = Path(engine_path)
        # Host code runs code the engine carries: only for an engine its caller vouches for
        # (built version-compatible in this process, or so recorded by a verified release).
        self.host_code = host_code
        # The hash the caller checked (a verified manifest's, a build record's): the bytes read to
        # deserialize must have it, so a file swapped after it was hashed never runs.
        self.sha256 = sha256
        # TensorRT's and torch's objects, made on first use (`_load`); untyped: tensorrt ships no stubs.
        self._engine: Any = None
        self._context: Any = None
        self._io: EngineIO | None = None
        self._stream: Any = None
        self._active_profile: int | None = None

    def _load(self):
        if self._engine is None:
            from pipeline.trt.host import build_environment

            plan = engine_bytes(self.path, self.sha256)  # first: a swapped file is refused on any host
            build_environment()  # one-line error when TensorRT or the GPU is missing
            import tensorrt as trt
            import torch

            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            runtime.engine_host_code_allowed = self.host_code
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                hint = "" if self.host_code else (
                    " (a version-compatible engine needs host code, allowed only for one its verified release "
                    "records as built so)")
                raise ArtifactError(f"engine {self.path} does not deserialize with this TensorRT/GPU{hint}; rebuild "
                                    "it here")
            self._io = describe_engine(engine, trt.TensorIOMode.INPUT)
            self._context = engine.create_execution_context()
            self._stream = torch.cuda.Stream()
            self._engine = engine
        return self._io

    def infer(self, batch: Batch) -> Batch:
        io = self._load()
        feed = {n: batch[n] for n in io.inputs}
        rows, sequence = next(iter(feed.values())).shape[:2]
        parts = []
        for chunk in plan_chunks(io.profiles, rows, sequence, str(self.path)):
            sliced = {n: v[chunk.start:chunk.stop] for n, v in feed.items()}
            outputs = self._execute(chunk.profile, pad_batch(sliced, chunk.rows, chunk.sequence))
            parts.append({n: trim_output(v, io.outputs[n], chunk.stop - chunk.start, sequence)
                          for n, v in outputs.items()})
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    def profiles(self) -> list[ProfileRange]:
        return self._load().profiles

    def run_profile(self, profile: int, feed: Batch) -> Batch:
        """One engine run on `profile`, for inputs it accepts as they are (benchmarks time each profile)."""
        io = self._load()
        return self._execute(profile, {n: feed[n] for n in io.inputs})

    def _execute(self, profile: int, feed: Batch) -> Batch:
        """One run of the engine on inputs that `profile` accepts, on the runner's own stream."""
        import tensorrt as trt
        import torch

        engine, context, stream = self._engine, self._context, self._stream
        with torch.cuda.stream(stream):
            if profile != self._active_profile:
                context.set_optimization_profile_async(profile, stream.cuda_stream)
                self._active_profile = profile
            keep = []
            for name, value in feed.items():
                tensor = torch.from_numpy(np.ascontiguousarray(
                    value.astype(trt.nptype(engine.get_tensor_dtype(name))))).cuda()
                keep.append(tensor)
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self._load().outputs:
                dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
                outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                context.set_tensor_address(name, outputs[name].data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise ArtifactError(f"engine {self.path}: execution failed")
        stream.synchronize()
        return {name: value.float().cpu().numpy() for name, value in outputs.items()}


def engine_bytes(path: Path, sha256: str | None) -> bytes:
    """An engine file's bytes, read once and checked against `sha256` (when given): the bytes
    that were hashed are the bytes that are deserialized."""
    import hashlib

    if not Path(path).is_file():
        raise ArtifactError(f"engine {path} not found; build it with shipyard build")
    plan = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(plan).hexdigest() != sha256:
        raise ArtifactError(f"engine {path} changed after it was hashed and checked (sha256 is no longer "
                            f"{sha256[:12]}); not deserialized: restore the release or build it again")
    return plan


# The runner of each artifact format (`pipeline.runtimes`): adding a runtime adds one entry here.
