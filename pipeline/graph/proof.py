"""Writing a rewritten ONNX graph: drop stale annotations, then prove it loads and runs.

Every stage that writes a graph (prune, quantize, the typed TensorRT ONNX) calls `prove_runs`
on its temporary file before renaming it into place, so exit 0 never ships a graph ONNX Runtime
refuses. Shape annotations (`value_info`, left by `onnx.shape_inference`, onnxsim or ModelOpt)
describe the graph as it was: after a weight is sliced they are wrong, and ONNX Runtime trusts
them ("Incompatible dimensions for matrix multiplication"), so surgery drops them and lets the
runtime infer shapes again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from pipeline.errors import ShipyardError

Batch = dict[str, np.ndarray]
# Two shapes, so a graph whose sequence or batch axis was frozen by a stale annotation fails here.
PROBE_SHAPES = ((1, 7), (3, 19))
_DTYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


class GraphCheckError(ShipyardError):
    """A stage produced (or was given) a graph that does not load or run in ONNX Runtime."""


def drop_shape_annotations(model: onnx.ModelProto) -> None:
    """Remove intermediate shape annotations (`value_info`); inputs and outputs keep theirs."""
    del model.graph.value_info[:]


def drop_dead(model: onnx.ModelProto) -> None:
    """In place: remove nodes none of whose outputs is read (repeatedly, so whole dead chains go),
    then initializers nothing reads. Surgery leaves such nodes behind: the patched originals of
    cloned shape constants, Q/DQ pairs nobody reads, the Reshapes around an unfolded Gemm."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def probe_batches(model: onnx.ModelProto) -> list[Batch]:
    """Token inputs for the graph's own input names: real-looking ids, a padded row, no data."""
    initializers = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    batches = []
    for rows, length in PROBE_SHAPES:
        mask = np.ones((rows, length), dtype=np.int64)
        mask[-1, length // 2:] = 0  # one row with padding, as real batches have
        batch = {}
        for graph_input in model.graph.input:
            if graph_input.name in initializers:
                continue
            dtype = _DTYPES.get(graph_input.type.tensor_type.elem_type, np.int64)
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
    except Exception as err:  # onnx raises ValidationError and InferenceError with long texts
        raise GraphCheckError(f"{what}: the written graph fails onnx.checker ({_first_line(err)}); "
                              "this graph's structure is not supported, nothing was written") from None
    model = onnx.load(str(path), load_external_data=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in probe_batches(model):
            outputs = session.run(None, batch)
            if not all(np.isfinite(o).all() for o in outputs if np.issubdtype(o.dtype, np.floating)):
                raise GraphCheckError(f"{what}: the written graph returns NaN or Inf on a probe batch; "
                                      "nothing was written")
    except GraphCheckError:
        raise
    except Exception as err:  # onnxruntime's Fail, InvalidGraph, RuntimeException...
        raise GraphCheckError(f"{what}: the written graph does not run in ONNX Runtime ({_first_line(err)}); "
                              "nothing was written") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
