"""Backends behind one contract: `infer(batch: dict[str, ndarray]) -> dict[str, ndarray]`.

Runners load lazily (torch and onnxruntime are imported on first use) and answer with numpy
arrays, so `compare.py` never needs to know which backend produced an output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import ArtifactError, ModelError

Batch = dict[str, np.ndarray]


class TorchRunner:
    """The reference: the fine-tuned PyTorch model in eval mode, FP32, on CPU.

    Only the inputs its `forward` takes are passed: DistilBERT and RoBERTa have no
    `token_type_ids`, whatever the tokenizer returned."""

    def __init__(self, model_dir: Path, threads: int = 0, task: str = "text-classification",
                 allow_pickle: bool = False) -> None:
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.task = task
        self.allow_pickle = allow_pickle
        self._model = None
        self._accepts: set[str] = set()

    def _load(self):
        if self._model is None:
            import inspect

            import torch
            import transformers

            from pipeline.tasks import AUTO_CLASSES

            if self.threads:
                torch.set_num_threads(self.threads)
            auto_class = getattr(transformers, AUTO_CLASSES[self.task])
            self._model = auto_class.from_pretrained(
                str(self.model_dir), local_files_only=True, dtype=torch.float32, trust_remote_code=False,
                use_safetensors=None if self.allow_pickle else True, weights_only=True,
            ).eval()
            self._accepts = set(inspect.signature(self._model.forward).parameters)
        return self._model

    @property
    def model(self):
        return self._load()

    def infer(self, batch: Batch) -> Batch:
        import torch

        model = self._load()
        from pipeline.tasks import OUTPUTS

        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in self._accepts})
        outputs = {name: getattr(out, name).float().numpy() for name in OUTPUTS[self.task]}
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
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError, Exception) as err:
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
        return {o.name: value for o, value in zip(session.get_outputs(), outputs)}


ENGINE_SUFFIXES = (".engine", ".plan")


class TrtRunner:
    """A serialized TensorRT engine on the first CUDA device; GPU buffers are torch tensors.

    Each batch picks the first optimization profile whose [min, max] covers its shape, so an
    engine with several profiles serves every batch one of them accepts.
    """

    def __init__(self, engine_path: Path) -> None:
        self.path = Path(engine_path)
        self._engine = None
        self._context = None

    def _load(self):
        if self._engine is None:
            from pipeline.stages.build import build_environment

            build_environment()  # one-line error when TensorRT or the GPU is missing
            import tensorrt as trt

            if not self.path.is_file():
                raise ArtifactError(f"engine {self.path} not found; build it with shipyard build")
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            runtime.engine_host_code_allowed = True  # version-compatible engines carry their runtime
            self._engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise ArtifactError(f"engine {self.path} does not deserialize with this TensorRT/GPU; rebuild it here")
            self._context = self._engine.create_execution_context()
        return self._engine, self._context

    def _profile_for(self, engine, batch: Batch) -> int:
        def accepts(index: int, name: str, value: np.ndarray) -> bool:
            low, _, high = engine.get_tensor_profile_shape(name, index)
            return all(lo <= d <= hi for d, lo, hi in zip(value.shape, low, high))

        for index in range(engine.num_optimization_profiles):
            if all(accepts(index, name, value) for name, value in batch.items()):
                return index
        raise ArtifactError(f"engine {self.path}: no optimization profile accepts batch shape "
                            f"{next(iter(batch.values())).shape}; add a profile to the target")

    def infer(self, batch: Batch) -> Batch:
        import tensorrt as trt
        import torch

        engine, context = self._load()
        stream = torch.cuda.current_stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        feed = {n: batch[n] for n in inputs}
        context.set_optimization_profile_async(self._profile_for(engine, feed), stream.cuda_stream)
        keep = []
        for name in inputs:
            tensor = torch.from_numpy(feed[name].astype(trt.nptype(engine.get_tensor_dtype(name)))).cuda()
            keep.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in names:
            if name in inputs:
                continue
            dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError(f"engine {self.path}: execution failed")
        stream.synchronize()
        return {name: value.float().cpu().numpy() for name, value in outputs.items()}


def runner_for(path: Path):
    """The runner for an artifact file: TensorRT for engines, ONNX Runtime for ONNX."""
    return TrtRunner(path) if Path(path).suffix in ENGINE_SUFFIXES else OrtRunner(path)


def session_with_outputs(model, tensors: list[str]):
    """An ONNX Runtime session over `model` that also returns the named intermediate tensors.

    Graph optimizations are off so that the tensors asked for are not fused away.
    """
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
