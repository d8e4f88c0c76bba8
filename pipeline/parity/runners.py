"""Backends behind one contract: `infer(batch: dict[str, ndarray]) -> dict[str, ndarray]`.

Runners load lazily (torch and onnxruntime are imported on first use) and answer with numpy
arrays, so `compare.py` never needs to know which backend produced an output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError, ModelError
from pipeline.runtimes import RUNTIMES, ArtifactFormat, format_of_path

Batch = dict[str, np.ndarray]


def torch_device(setting: str = "auto") -> str:
    """Where PyTorch runs the model (`model.device`): "auto" is the first CUDA device when torch
    sees one, else the CPU; "cuda" without one is refused."""
    if setting == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if setting == "cuda":
        raise ModelError("model.device is cuda but torch sees no CUDA device (a CPU build of torch, or no GPU); "
                         "set model.device to auto or cpu")
    return "cpu"


class TorchRunner:
    """The reference: the fine-tuned PyTorch model in eval mode, FP32, on `device` (`torch_device`;
    its outputs are compared within the gates, not bit for bit, on another device).

    Only the inputs its `forward` takes are passed: DistilBERT and RoBERTa have no
    `token_type_ids`, whatever the tokenizer returned."""

    def __init__(self, model_dir: Path, *, task: str, threads: int = 0, allow_pickle: bool = False,
                 device: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.device = device
        self.threads = threads
        self.task = task
        self.allow_pickle = allow_pickle
        self._model = None

    def cache_identity(self) -> dict[str, Any]:
        """What a stage's cache key records of this reference (`pipeline.run.cache.call_identity`)."""
        return {"torch": self.model_dir, "task": self.task, **({"device": self.device} if self.device != "cpu" else {})}
        self._accepts: set[str] = set()

    def _load(self):
        if self._model is None:
            import inspect

            import torch
            import transformers

            from pipeline.tasks import task_spec

            if self.threads:
                torch.set_num_threads(self.threads)
            auto_class = getattr(transformers, task_spec(self.task).auto_class)
            self._model = auto_class.from_pretrained(
                str(self.model_dir), local_files_only=True, dtype=torch.float32, trust_remote_code=False,
                use_safetensors=None if self.allow_pickle else True, weights_only=True,
            ).eval().to(self.device)
            self._accepts = set(inspect.signature(self._model.forward).parameters)
        return self._model

    @property
    def model(self):
        return self._load()

    def infer(self, batch: Batch) -> Batch:
        import torch

        model = self._load()
        from pipeline.tasks import task_spec

        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to(self.device) for k, v in batch.items() if k in self._accepts})
        outputs = {name: getattr(out, name).float().cpu().numpy() for name in task_spec(self.task).outputs}
        if not all(np.isfinite(v).all() for v in outputs.values()):
            # The reference must be trustworthy: a NaN would make every comparison meaningless.
            raise ModelError(f"model {self.model_dir} gives NaN or Inf outputs on a batch of {len(batch['input_ids'])} "
                             "rows; its weights are damaged or overflow in float32; fix the model")
        return outputs


def check_onnx_file(path: Path) -> None:
    """Fail clearly on a missing, truncated or corrupt ONNX file, before a session is built."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file {path} not found; pass the path of an exported .onnx model")
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ArtifactError(f"ONNX file {path} is truncated or corrupt ({first}); re-export it") from None


class OrtRunner:
    """An ONNX artifact on ONNX Runtime's CPU execution provider."""

    def __init__(self, onnx_path: Path, threads: int = 0) -> None:
        self.path = Path(onnx_path)
        self.threads = threads
        self._session = None

    def _load(self):
        if self._session is None:
            import onnxruntime as ort

            check_onnx_file(self.path)
            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            options.log_severity_level = 3
            self._session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        return self._session

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._load().get_inputs()]

    def infer(self, batch: Batch) -> Batch:
        session = self._load()
        names = self.input_names
        outputs = session.run(None, {k: v for k, v in batch.items() if k in names})
        return {o.name: value for o, value in zip(session.get_outputs(), outputs, strict=True)}


class OvRunner:
    """An OpenVINO IR (`.xml` with its `.bin`) on OpenVINO's CPU plugin, latency-tuned, with
    `threads` inference threads (0: OpenVINO's choice)."""

    def __init__(self, xml_path: Path, threads: int = 0) -> None:
        self.path = Path(xml_path)
        self.threads = threads
        self._compiled: Any = None
        self._request: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []

    def _load(self):
        if self._compiled is None:
            from pipeline.runtimes import require

            require("openvino", f"running {self.path}")
            import openvino as ov

            check_openvino_file(self.path)
            config = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": self.threads} if self.threads else {})}
            self._compiled = ov.Core().compile_model(str(self.path), "CPU", config)
            self._request = self._compiled.create_infer_request()
            self._inputs = [port.get_any_name() for port in self._compiled.inputs]
            self._outputs = [port.get_any_name() for port in self._compiled.outputs]
        return self._compiled

    @property
    def input_names(self) -> list[str]:
        self._load()
        return list(self._inputs)

    @property
    def inference_precision(self) -> str:
        """What OpenVINO runs the IR's float layers in here: `bf16` by default on a CPU with
        avx512_bf16 or AMX, `f32` on others (no IR setting pins it)."""
        return self._load().get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def infer(self, batch: Batch) -> Batch:
        compiled = self._load()
        result = self._request.infer({k: v for k, v in batch.items() if k in self._inputs})
        # Copies: the request reuses its output buffers on the next call.
        return {name: np.array(result[port]) for name, port in zip(self._outputs, compiled.outputs, strict=True)}


def check_openvino_file(path: Path) -> None:
    """Fail clearly on a missing IR, a missing weights file or an IR OpenVINO cannot read."""
    import openvino as ov

    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise ArtifactError(f"OpenVINO IR {path} (with {path.with_suffix('.bin').name} beside it) not found; pass "
                            "the .xml of an IR Shipyard wrote")
    try:
        ov.Core().read_model(str(path))
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ArtifactError(f"OpenVINO IR {path} does not read ({first}); write it again") from None


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
RUNNERS = {"onnx": OrtRunner, "openvino": OvRunner, "tensorrt-engine": TrtRunner}
# What proves a file of each format is whole, without running it (`shipyard verify`).
FILE_CHECKS = {"onnx": check_onnx_file, "openvino": check_openvino_file}


def runner_for(path: Path, fmt: ArtifactFormat | None = None, host_code: bool = False, sha256: str | None = None,
               threads: int = 0):
    """The runner for an artifact file of format `fmt` (by default, its suffix's): TensorRT for
    engines (their bytes checked against `sha256`), OpenVINO for IRs, ONNX Runtime for ONNX."""
    fmt = fmt or format_of_path(str(path))
    if fmt == "tensorrt-engine":
        return TrtRunner(path, host_code, sha256)
    return RUNNERS[fmt](path, threads)
