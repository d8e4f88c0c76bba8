"""Proving a written ONNX graph loads and runs, before it is renamed into place.

Every stage that writes a graph (prune, quantize, the typed TensorRT ONNX) calls `prove_runs`
on its temporary file, so exit 0 never ships a graph ONNX Runtime refuses: onnx's full check,
then two probe batches of different batch and sequence sizes, so a stale shape annotation that
froze an axis fails here ("Incompatible dimensions for matrix multiplication").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from pipeline.errors import ShipyardError

Batch = dict[str, np.ndarray]
# Two shapes, so a graph whose sequence or batch axis was frozen by a stale annotation fails here.
PROBE_SHAPES = ((1, 7), (3, 19))
_DTYPES = {ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32}


class GraphCheckError(ShipyardError):
    """A stage produced (or was given) a graph that does not load or run in ONNX Runtime."""


def probe_batches(model: ir.Model) -> list[Batch]:
    """Token inputs for the graph's own input names: real-looking ids, a padded row, no data."""
    rng = np.random.default_rng(0)
    batches = []
    for rows, length in PROBE_SHAPES:
        mask = np.ones((rows, length), dtype=np.int64)
        mask[-1, length // 2:] = 0  # one row with padding, as real batches have
        batch = {}
        for graph_input in model.graph.inputs:
            if graph_input.is_initializer() or not graph_input.name:
                continue
            dtype = _DTYPES.get(graph_input.dtype, np.int64) if graph_input.dtype is not None else np.int64
            value: np.ndarray
            if "mask" in graph_input.name:
                value = mask
            elif graph_input.name == "input_ids":
                value = rng.integers(100, 1000, size=(rows, length)) * mask
            elif graph_input.name == "position_ids":
                value = np.broadcast_to(np.arange(length), (rows, length))
            else:
                value = np.zeros((rows, length))
            batch[graph_input.name] = np.ascontiguousarray(value, dtype=dtype)
        batches.append(batch)
    return batches


def prove_runs(path: Path, what: str) -> None:
    """Fail with `GraphCheckError` unless `path` passes onnx's full check, loads in ONNX Runtime
    and returns finite outputs for two batch/sequence shapes."""
    import onnxruntime as ort

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:  # long texts
        raise GraphCheckError(f"{what}: the written graph fails onnx.checker ({_first_line(err)}); "
                              "this graph's structure is not supported, nothing was written") from None
    model = ir.load(str(path))  # reads the inputs; the weights stay on disk
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in probe_batches(model):
            outputs = session.run(None, batch)
            if not all(np.isfinite(o).all() for o in outputs if np.issubdtype(o.dtype, np.floating)):
                raise GraphCheckError(f"{what}: the written graph returns NaN or Inf on a probe batch; "
                                      "nothing was written")
    except ort_errors() as err:
        raise GraphCheckError(f"{what}: the written graph does not run in ONNX Runtime ({_first_line(err)}); "
                              "nothing was written") from None


def ort_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises for a graph it cannot load or run (Fail, InvalidGraph,
    NotImplemented, ...): only these mean "this graph is not supported". A MemoryError, an
    interrupt or a bug elsewhere keeps its own type and exit code."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(value for value in vars(state).values()
                 if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == state.__name__)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
