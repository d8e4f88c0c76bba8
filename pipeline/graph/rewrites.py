"""Generic rewrites that make an exported graph ready for surgery, whatever tool wrote it:
constants forwarded through Identity untied, onnxsim's Reshape-Gemm-Reshape projections unfolded,
and the weights several layers share found (so they are refused, not half-sliced)."""

from __future__ import annotations

import onnx

from pipeline.graph.bert import Graph
from pipeline.graph.proof import drop_dead


def _identity_roots(model: onnx.ModelProto) -> dict[str, str]:
    """Identity output -> the tensor it finally forwards (chains followed)."""
    forward = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    roots = {}
    for out in forward:
        root = forward[out]
        while root in forward:
            root = forward[root]
        roots[out] = root
    return roots


def shared_weights(model: onnx.ModelProto) -> dict[str, int]:
    """2-D initializers that several MatMuls read, directly or through Identity: name -> readers.

    Exporters deduplicate equal tensors, but two trained weight matrices are never equal by
    chance, so a shared 2-D weight means the layers really share it (ALBERT)."""
    roots = _identity_roots(model)
    matrices = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            root = roots.get(node.input[1], node.input[1])
            if root in matrices:
                readers[root] = readers.get(root, 0) + 1
    return {name: count for name, count in readers.items() if count > 1}


def untie_identities(model: onnx.ModelProto) -> int:
    """In place: each Identity of a constant becomes its own initializer copy, and each Identity of
    an activation is bypassed, so every layer owns the tensors surgery will slice. Returns how many
    Identity nodes were removed."""
    graph = model.graph
    roots = _identity_roots(model)
    if not roots:
        return 0
    init = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    removed = []
    for node in graph.node:
        if node.op_type != "Identity" or node.output[0] in outputs:
            continue
        root = roots[node.output[0]]
        if root in init:
            copy = onnx.TensorProto()
            copy.CopyFrom(init[root])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            for consumer in graph.node:
                for i, name in enumerate(consumer.input):
                    if name == node.output[0]:
                        consumer.input[i] = root
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def unfold_gemms(model: onnx.ModelProto) -> int:
    """In place: Reshape(x, [-1, K]) -> Gemm(., W, b) -> Reshape(., [b, s, N]), as onnxsim writes a
    projection, becomes MatMul(x, W) -> Add(b) writing the second Reshape's output. Only Gemms with
    a constant 2-D weight, alpha = beta = 1 and no transposed input are rewritten (transB is
    folded into W). Returns how many were rewritten."""
    g = Graph(model)
    rewritten = 0
    for gemm in [n for n in g.graph.node if n.op_type == "Gemm"]:
        flatten = g.producer.get(gemm.input[0])
        after = g.consumers.get(gemm.output[0], [])
        weight = gemm.input[1]
        if (flatten is None or flatten.op_type != "Reshape" or len(after) != 1 or after[0].op_type != "Reshape"
                or weight not in g.init or len(g.init[weight].dims) != 2 or _attribute(gemm, "transA", 0)
                or _attribute(gemm, "alpha", 1.0) != 1.0 or _attribute(gemm, "beta", 1.0) != 1.0):
            continue
        flat_shape = g.constant_value(flatten.input[1])
        columns = g.init[weight].dims[0 if _attribute(gemm, "transB", 0) else 1]
        if (flat_shape is None or flat_shape.size != 2
                or not _restores_leading_dims(g, after[0].input[1], flatten.input[0], columns)):
            continue
        unflatten = after[0]
        if _attribute(gemm, "transB", 0):
            g.set_array(weight, g.array(weight).T.copy())
        matmul_out = f"{gemm.output[0]}_matmul"
        position = next(i for i, n in enumerate(g.graph.node) if n is gemm)
        new_nodes = [onnx.helper.make_node("MatMul", [flatten.input[0], weight], [matmul_out], name=f"{gemm.name}_MatMul")]
        if len(gemm.input) > 2 and gemm.input[2]:
            new_nodes.append(onnx.helper.make_node("Add", [matmul_out, gemm.input[2]], [unflatten.output[0]],
                                                   name=f"{gemm.name}_Add"))
        else:
            new_nodes[0].output[0] = unflatten.output[0]
        for offset, node in enumerate(new_nodes):
            g.graph.node.insert(position + offset, node)
        g.graph.node.remove(gemm)
        g.graph.node.remove(unflatten)
        rewritten += 1
    if rewritten:
        drop_dead(model)
    return rewritten


def _restores_leading_dims(g: Graph, shape: str, source: str, columns: int) -> bool:
    """True when `shape` is Concat(Slice(Shape(source), 0, ...), [columns]): the leading dims of
    the tensor that was flattened, then the projection's width, so MatMul on it is the same."""
    concat = g.producer.get(shape)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return False
    width = g.constant_value(concat.input[1])
    leading = g.producer.get(concat.input[0])
    if width is None or width.size != 1 or int(width.reshape(-1)[0]) != columns:
        return False
    if leading is None or leading.op_type != "Slice" or len(leading.input) < 3:
        return False
    origin = g.producer.get(leading.input[0])
    start = g.constant_value(leading.input[1])
    return (origin is not None and origin.op_type == "Shape" and origin.input[0] == source
            and start is not None and start.size == 1 and int(start.reshape(-1)[0]) == 0)
