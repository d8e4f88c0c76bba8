"""Generic rewrites that make an exported graph ready for surgery, whatever tool wrote it:
shared constants untied (behind Identity or read directly), onnxsim's Reshape-Gemm-Reshape projections unfolded,
and the weights several layers share found (so they are refused, not half-sliced)."""

from __future__ import annotations

import onnx_ir as ir

from pipeline.graph.model import add_initializer, constant, drop_dead, initializer, set_weight


def _identity_root(value: ir.Value) -> ir.Value:
    """The value an Identity chain ending in `value` finally forwards (`value` itself if none)."""
    while (node := value.producer()) is not None and node.op_type == "Identity" and node.inputs[0] is not None:
        value = node.inputs[0]
    return value


def shared_weights(model: ir.Model) -> dict[str, int]:
    """2-D initializers that several MatMuls read, directly or through Identity: name -> readers.

    Exporters deduplicate equal tensors, but two trained weight matrices are never equal by
    chance, so a shared 2-D weight means the layers really share it (ALBERT)."""
    readers: dict[str, int] = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
            root = _identity_root(node.inputs[1])
            if initializer(root) is not None and len(root.shape or ()) == 2 and root.name:
                readers[root.name] = readers.get(root.name, 0) + 1
    return {name: count for name, count in readers.items() if count > 1}


def untie_constants(model: ir.Model) -> int:
    """In place: every reader of a constant gets its own copy, so every layer owns the tensors
    surgery slices or smoothing rescales. Exporters and onnxsim deduplicate equal tensors (a
    LayerNorm's ones and zeros, or every zero bias, straight from initialisation): behind Identity
    nodes, which are removed (an Identity of an activation is bypassed), or read directly by many
    nodes. Weights several MatMuls share (ALBERT) are refused by `shared_weights` before, and are
    left alone here. Returns how many Identity nodes were removed."""
    graph = model.graph
    outputs = set(graph.outputs)
    removed = 0
    for node in list(graph):
        if node.op_type != "Identity" or node.outputs[0] in outputs or node.inputs[0] is None:
            continue
        root = _identity_root(node.outputs[0])
        if root.is_initializer():
            own = add_initializer(graph, root.const_value.numpy(), node.outputs[0].name or root.name or "untied")  # type: ignore[union-attr]
            node.outputs[0].replace_all_uses_with(own)
        else:
            node.outputs[0].replace_all_uses_with(root)
        graph.remove(node, safe=True)
        removed += 1
    shared = shared_weights(model)
    for value in list(graph.initializers.values()):
        uses = list(value.uses())
        # Float tensors only: shape and axis constants are never sliced (surgery clones the ones it
        # patches), and scalars are never rescaled.
        if (len(uses) < 2 or value.name in shared or value.const_value is None
                or not value.const_value.dtype.is_floating_point() or not value.const_value.shape):
            continue
        for use in uses[1:]:
            own = add_initializer(graph, value.const_value.numpy(), f"{value.name}_{use.node.name}")
            use.node.replace_input_with(use.idx, own)
    return removed


def _attribute(node: ir.Node, name: str, default):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def unfold_gemms(model: ir.Model) -> int:
    """In place: Reshape(x, [-1, K]) -> Gemm(., W, b) -> Reshape(., [b, s, N]), as onnxsim writes a
    projection, becomes MatMul(x, W) -> Add(b) writing the second Reshape's output. Only Gemms with
    a constant 2-D weight, alpha = beta = 1 and no transposed input are rewritten (transB is
    folded into W). Returns how many were rewritten."""
    graph = model.graph
    rewritten = 0
    for gemm in [n for n in graph if n.op_type == "Gemm"]:
        flatten = gemm.inputs[0].producer() if gemm.inputs[0] is not None else None
        after = gemm.outputs[0].consumers()
        weight = gemm.inputs[1]
        if (flatten is None or flatten.op_type != "Reshape" or len(after) != 1 or after[0].op_type != "Reshape"
                or weight is None or initializer(weight) is None or len(weight.shape or ()) != 2 or _attribute(gemm, "transA", 0)
                or _attribute(gemm, "alpha", 1.0) != 1.0 or _attribute(gemm, "beta", 1.0) != 1.0):
            continue
        assert weight is not None and flatten.inputs[0] is not None
        flat_shape = constant(flatten.inputs[1])
        w = initializer(weight)
        columns = w.shape[0 if _attribute(gemm, "transB", 0) else 1]  # type: ignore[union-attr]
        if (flat_shape is None or flat_shape.size != 2
                or not _restores_leading_dims(after[0].inputs[1], flatten.inputs[0], columns)):
            continue
        unflatten = after[0]
        if _attribute(gemm, "transB", 0):
            set_weight(weight, w.T.copy())  # type: ignore[union-attr]
        has_bias = len(gemm.inputs) > 2 and gemm.inputs[2] is not None
        matmul = ir.Node("", "MatMul", [flatten.inputs[0], weight], name=f"{gemm.name}_MatMul")
        new_nodes = [matmul]
        result = matmul.outputs[0]
        if has_bias:
            add = ir.Node("", "Add", [matmul.outputs[0], gemm.inputs[2]], name=f"{gemm.name}_Add")
            new_nodes.append(add)
            result = add.outputs[0]
        matmul.outputs[0].name = f"{gemm.outputs[0].name}_matmul"
        final = unflatten.outputs[0]
        name = final.name
        graph.insert_before(gemm, new_nodes)
        final.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove([unflatten, gemm], safe=True)
        result.name = name
        rewritten += 1
    if rewritten:
        drop_dead(model)
    return rewritten


def _restores_leading_dims(shape: ir.Value | None, source: ir.Value, columns: int) -> bool:
    """True when `shape` is Concat(Slice(Shape(source), 0, ...), [columns]): the leading dims of
    the tensor that was flattened, then the projection's width, so MatMul on it is the same."""
    concat = shape.producer() if shape is not None else None
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
        return False
    width = constant(concat.inputs[1])
    leading = concat.inputs[0].producer() if concat.inputs[0] is not None else None
    if width is None or width.size != 1 or int(width.reshape(-1)[0]) != columns:
        return False
    if leading is None or leading.op_type != "Slice" or len(leading.inputs) < 3:
        return False
    origin = leading.inputs[0].producer() if leading.inputs[0] is not None else None
    start = constant(leading.inputs[1])
    return (origin is not None and origin.op_type == "Shape" and origin.inputs[0] is source
            and start is not None and start.size == 1 and int(start.reshape(-1)[0]) == 0)
