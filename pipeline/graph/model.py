"""The one graph model: every stage that reads or rewrites an ONNX graph does it on onnx-ir.

onnx-ir keeps each value's producer and uses current while nodes are inserted, removed or
rewired, so no stage keeps (and re-syncs) a tensor-name index of its own. It reads weights lazily
from external data and writes external data, so a model past protobuf's 2 GB limit goes through
every stage. This module adds the few things every stage needs on top of it: a constant's value
whether it is an initializer or a `Constant` node (any of its attribute forms), replacing a weight
in its own dtype, a fresh initializer under an unused name, and saving with external data when
the weights are large.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

# Weights beyond this go to an external data file beside the graph: protobuf refuses a message
# over 2 GB, and a graph with its weights inline must stay below that with room for the rest.
EXTERNAL_DATA_ABOVE = 1 << 30


def load(path: Path) -> ir.Model:
    """The graph at `path`; external data stays on disk until a tensor is read."""
    return ir.load(str(path))


def input_names(path: Path) -> list[str]:
    """The token inputs a graph file takes (initializers listed as inputs left out)."""
    return [v.name for v in load(path).graph.inputs if not v.is_initializer() and v.name]


def from_proto(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    with _initializers_untyped(model):
        return ir.serde.serialize_model(model)


@contextlib.contextmanager
def _initializers_untyped(model: ir.Model) -> Iterator[None]:
    """While writing, initializers carry no type or shape of their own, so no `value_info` is
    written for them (their tensors say it). onnx-ir writes one for each, and ONNX Runtime's float16
    converter then retypes those entries but not the float32 tensors it keeps for LayerNorm, and the
    typed graph fails onnx's checker."""
    saved = {}
    for value in model.graph.initializers.values():
        if not value.is_graph_input() and not value.is_graph_output():
            saved[value] = (value.type, value.shape)
            value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, (kind, shape) in saved.items():
            value.type, value.shape = kind, shape


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def external_data_name(path: Path) -> str:
    """The external data file of the graph at `path`, as Shipyard names it (Optimum's convention)."""
    return f"{Path(path).name}_data"


def save(model: ir.Model, path: Path, data_name: str | None = None) -> list[Path]:
    """Write `model` to `path`, its weights inline, or in `data_name` (default `<path name>_data`)
    beside it when they exceed `EXTERNAL_DATA_ABOVE`. Returns the files written."""
    path = Path(path)
    # ONNX Runtime's quantizers leave nodes out of order on graphs with `If` subgraphs (DeBERTa's
    # relative positions), which onnx's checker refuses; sorting a sorted graph keeps its bytes.
    TopologicalSortPass()(model)
    inline = weight_bytes(model) <= EXTERNAL_DATA_ABOVE
    data = path.with_name(data_name or external_data_name(path))
    # onnx-ir writes a tensor it read from external data back as a reference to that file, and
    # invalidates the tensors that read the file it overwrites: read those into memory first. A
    # Constant node's tensor is never moved to the new file (torch's exporter puts the position ids
    # of a large model in external data), so it always is.
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and (inline or Path(tensor.path).resolve() == data.resolve()):
            value.const_value = ir.tensor(tensor.numpy(), name=value.name)
    for node in model.graph:
        for name, attribute in list(node.attributes.items()):
            if attribute.type == ir.AttributeType.TENSOR and isinstance(attribute.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attribute.value.numpy(), name=attribute.value.name))
    with _initializers_untyped(model):
        if inline:
            ir.save(model, str(path))
            return [path]
        ir.save(model, str(path), external_data=data.name, size_threshold_bytes=1024)
    return [path, data]


STANDARD_DOMAINS = ("", "ai.onnx")


def is_packed_attention(node: ir.Node) -> bool:
    """ONNX Runtime's contrib `Attention` (com.microsoft): one packed QKV weight as input 1, what its
    optimizer fuses a BERT into. The standard ONNX `Attention` (opset 23, torch's dynamo exporter)
    shares the name but takes Q, K and V as activations: no weight to quantize or smooth."""
    return node.op_type == "Attention" and node.domain == "com.microsoft"


def standard_attention_nodes(model: ir.Model) -> list[ir.Node]:
    """The standard ONNX `Attention` nodes of a graph (see `is_packed_attention`)."""
    return [node for node in model.graph if node.op_type == "Attention" and node.domain in STANDARD_DOMAINS]


def embedding_gathers(model: ir.Model) -> list[ir.Node]:
    """The Gathers that look rows up in a weight table (word, position, token-type embeddings):
    their data input is an initializer of rank 2."""
    return [node for node in model.graph if node.op_type == "Gather" and node.inputs and node.inputs[0] is not None
            and node.inputs[0].const_value is not None and len(node.inputs[0].const_value.shape) == 2]


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or of a `Constant` node's output (any attribute form), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for key, attribute in node.attributes.items():
        if key in ("value", "sparse_value"):
            return attribute.as_tensor().numpy()
        if key in ("value_float", "value_int"):
            return np.array(attribute.value, dtype=np.float32 if key == "value_float" else np.int64)
        if key in ("value_floats", "value_ints"):
            return np.array(list(attribute.value), dtype=np.float32 if key == "value_floats" else np.int64)
    return None


def initializer(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer (not of a Constant node: those are not weights), else None."""
    return value.const_value.numpy() if value is not None and value.is_initializer() and value.const_value is not None \
        else None


def set_weight(value: ir.Value, array: np.ndarray) -> None:
    """Replace an initializer's value, keeping its dtype; its recorded shape follows."""
    dtype = value.const_value.numpy().dtype if value.const_value is not None else array.dtype
    tensor = ir.tensor(np.ascontiguousarray(array, dtype=dtype), name=value.name)
    value.const_value, value.shape, value.dtype = tensor, ir.Shape(array.shape), tensor.dtype


def unique_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers) | {o.name for n in graph for o in n.outputs} | {v.name for v in graph.inputs}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def add_initializer(graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
    """A new initializer holding `array`, under `base` or the first free name after it."""
    name = unique_name(graph, base)
    # ascontiguousarray makes a scalar 1-D: a Div by it would then make its output 1-D too.
    tensor = ir.tensor(np.ascontiguousarray(array).reshape(np.shape(array)), name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def drop_dead(model: ir.Model) -> None:
    """In place: remove nodes nothing reads (whole dead chains) and initializers nothing reads.
    Surgery leaves such nodes behind: the patched originals of cloned shape constants, Q/DQ pairs
    nobody reads, the Reshapes around an unfolded Gemm."""
    RemoveUnusedNodesPass()(model)


def drop_shape_annotations(model: ir.Model) -> None:
    """Forget intermediate shapes and types (`value_info`, left by shape inference, onnxsim or
    ModelOpt): after a weight is sliced they are wrong and ONNX Runtime trusts them; inputs,
    outputs and initializers keep theirs."""
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for value in node.outputs:
            if value not in outputs:
                value.shape = None
                value.type = None


def session(model: ir.Model, outputs: Sequence[str] = (), optimize: bool = True):
    """An ONNX Runtime CPU session over `model`, also returning the named intermediate `outputs`
    (graph optimizations off then, so that they are not fused away). A model past protobuf's
    limit is handed over as a file with external data; `model` is not modified."""
    import onnxruntime as ort

    if outputs:
        model = model.clone()
        values = {v.name: v for node in model.graph for v in node.outputs} | {v.name: v for v in model.graph.inputs}
        present = {v.name for v in model.graph.outputs}
        model.graph.outputs.extend(values[name] for name in outputs if name not in present)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if outputs or not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if weight_bytes(model) <= EXTERNAL_DATA_ABOVE:
        return ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="shipyard-session-") as folder:
        path = Path(folder) / "model.onnx"
        save(model, path)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
