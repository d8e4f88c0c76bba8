"""Backends behind one contract: `infer(batch: dict[str, ndarray]) -> dict[str, ndarray]`.

Runners load lazily (torch and onnxruntime are imported on first use) and answer with numpy
arrays, so `compare.py` never needs to know which backend produced an output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError, ModelError
from pipeline.parity.engine import TrtRunner
from pipeline.runtimes import ArtifactFormat, format_of_path

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
