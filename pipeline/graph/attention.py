"""Find an encoder's attention blocks in an ONNX graph by structure: the heads a pruner slices.

Three forms are found. BERT's: from a Softmax, walking up to the Q·Kᵀ MatMul and the Q, K and V
projections (each its own MatMul, a bias, a Reshape to [B, S, H, d]), and down from softmax @ V
to the head-merging Reshape and the output projection. ModernBERT's: one fused Wqkv projection
split by a Reshape to [B, S, 3, H, d] (rotary embeddings act within each head). The standard ONNX
`Attention` op (opset 23, torch's dynamo exporter) on 4-D Q, K and V. On the score path, a
per-head bias the layers share (MPNet's relative positions) is recorded, to be sliced per layer.
Written here because no library exposes this for ONNX encoder graphs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pipeline.graph.bert import Graph, is_weight, matrix, order_of
from pipeline.graph.model import constant

# The ops between a projection and the attention's Q, K or V operand.
PATH_OPS = {"Transpose", "Reshape", "Add", "Mul", "Div"}


@dataclass
class AttentionBlock:
    layer: int
    q: tuple[str, str | None]  # (weight, bias); the bias is None where the projection has none
    k: tuple[str, str | None]
    v: tuple[str, str | None]
    out: str  # output projection weight
    out_bias: str | None = None
    split_reshapes: list[str] = field(default_factory=list)  # node names
    merge_reshape: str = ""
    context: str = ""  # softmax @ V, [batch, heads, seq, head_dim]
    num_heads: int = 0
    head_dim: int = 0
    # A fused projection (ModernBERT's Wqkv): q, k and v name one [hidden, 3 x heads x head_dim]
    # weight, its columns ordered (q|k|v, head, dim), split by one Reshape to [B, S, 3, H, d].
    fused: bool = False
    # Per-head additive score biases shared by every layer (MPNet's relative-position bias,
    # [B, H, S, S]): (Add node, input index) on this layer's score path, sliced per layer.
    head_biases: list[tuple[str, int]] = field(default_factory=list)

    @property
    def head_axis(self) -> int:
        """The axis of the head count in the splitting Reshapes' target shape."""
        return 3 if self.fused else 2

    def projections(self) -> list[tuple[str, str | None]]:
        """The distinct (weight, bias) projections that make Q, K and V."""
        return [self.q] if self.fused else [self.q, self.k, self.v]

    def qkv_columns(self, keep: list[int]) -> np.ndarray:
        """The columns of each projection that hold heads `keep` (every third of a fused one)."""
        cols = np.concatenate([np.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in keep])
        width = self.num_heads * self.head_dim
        return np.concatenate([cols + part * width for part in range(3)]) if self.fused else cols


def _walk_up_to_projection(g: Graph, tensor: ir.Value | None) -> tuple[ir.Node, list[ir.Node]] | None:
    """From an attention operand up through Transpose/Reshape/scale/bias to its weighted MatMul.
    Returns that MatMul and the Reshape nodes passed on the way."""
    reshapes: list[ir.Node] = []
    for _ in range(8):
        node = tensor.producer() if tensor is not None else None
        if node is None:
            return None
        if g.weight_of(node) is not None:
            return node, reshapes
        if node.op_type not in PATH_OPS:
            return None
        if node.op_type == "Reshape":
            reshapes.append(node)
            tensor = node.inputs[0]
            continue
        # Follow the operand that carries activations, not the scale or bias constant.
        candidates = [i for i in node.inputs if i is not None and not i.is_initializer()
                      and (p := i.producer()) is not None and p.op_type in PATH_OPS | {"MatMul"}]
        if not candidates:
            return None
        tensor = candidates[0]
    return None


def _head_axis_value(reshape: ir.Node, index: int) -> int | None:
    shape = reshape.inputs[1]
    value = constant(shape)
    if value is not None:
        return int(value[index]) if value.size > index else None
    concat = shape.producer() if shape is not None else None
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) <= index:
        return None
    part = constant(concat.inputs[index])
    return int(part.reshape(-1)[0]) if part is not None and part.size == 1 else None


def find_attention_blocks(g: Graph) -> list[AttentionBlock]:
    blocks = []
    order = order_of(g.graph)
    for node in g.graph:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            block = _standard_block(g, node)
            if block is not None:
                blocks.append((order[id(node)], block))
    for softmax in (n for n in g.graph if n.op_type == "Softmax"):
        scores = _find_scores_matmul(g, softmax)
        contexts = [c for c in softmax.outputs[0].consumers() if c.op_type == "MatMul"]
        if scores is None or len(contexts) != 1:
            continue
        context = contexts[0]
        fused = _fused_block(g, context, softmax)
        if fused is not None:
            blocks.append((order[id(softmax)], fused))
            continue
        q = _walk_up_to_projection(g, scores.inputs[0])
        k = _walk_up_to_projection(g, scores.inputs[1])
        v = _walk_up_to_projection(g, context.inputs[1])
        merge = _walk_down_to_output(g, context.outputs[0])
        if q is None or k is None or v is None or merge is None:
            continue
        merge_reshape, out_node = merge
        out = g.weight_of(out_node)
        projections: list[tuple[str, str | None]] = []
        for node, _ in (q, k, v):
            weight, bias = g.weight_of(node), g.bias_after(node)
            if weight is None or bias is None:
                break
            projections.append((weight, bias))
        if len(projections) != 3 or out is None:
            continue
        splits = [r for _, rs in (q, k, v) for r in rs]
        heads = {_head_axis_value(r, 2) for r in splits}
        head_dims = {_head_axis_value(r, 3) for r in splits}
        num_heads, head_dim = heads.pop() if len(heads) == 1 else None, head_dims.pop() if len(head_dims) == 1 else None
        if num_heads is None or head_dim is None:
            continue
        block = AttentionBlock(
            layer=0, q=projections[0], k=projections[1], v=projections[2], out=out,
            out_bias=g.bias_after(out_node), split_reshapes=[r.name or "" for r in splits],
            merge_reshape=merge_reshape.name or "", context=context.outputs[0].name or "",
            num_heads=num_heads, head_dim=head_dim, head_biases=_head_biases(g, scores, softmax, num_heads),
        )
        blocks.append((order[id(softmax)], block))
    blocks.sort(key=lambda item: item[0])
    for i, (_, block) in enumerate(blocks):
        block.layer = i
    return [b for _, b in blocks]


def _standard_block(g: Graph, node: ir.Node) -> AttentionBlock | None:
    """The standard ONNX `Attention` op (opset 23, torch's dynamo exporter) on 4-D Q, K and V:
    each made by a projection and a Reshape to [B, S, H, d]; its output [B, H, S, d] is merged by
    Transpose and Reshape into the output projection. 3-D inputs (heads as attributes) are not
    found, and the pruner refuses them."""
    if len(node.inputs) < 3 or node.attributes.get("q_num_heads") is not None:
        return None
    walks = [_walk_up_to_projection(g, node.inputs[i]) for i in range(3)]
    merge = _walk_down_to_output(g, node.outputs[0])
    if any(w is None for w in walks) or merge is None:
        return None
    projections = [(g.weight_of(w[0]), g.bias_after(w[0])) for w in walks if w is not None]
    out = g.weight_of(merge[1])
    splits = [r for w in walks if w is not None for r in w[1]]
    heads = {_head_axis_value(r, 2) for r in splits}
    head_dims = {_head_axis_value(r, 3) for r in splits}
    if any(w is None for w, _ in projections) or out is None or len(heads) != 1 or len(head_dims) != 1 or None in heads | head_dims:
        return None
    num_heads = heads.pop()
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    return AttentionBlock(
        layer=0, q=projections[0], k=projections[1], v=projections[2], out=out,  # type: ignore[arg-type]
        out_bias=g.bias_after(merge[1]), split_reshapes=[r.name or "" for r in splits],
        merge_reshape=merge[0].name or "", context=node.outputs[0].name or "", num_heads=num_heads,  # type: ignore[arg-type]
        head_dim=head_dims.pop(),  # type: ignore[arg-type]
        head_biases=[(node.name or "", 3)] if mask is not None and _from_head_table(mask, num_heads) else [])  # type: ignore[arg-type]


def _fused_block(g: Graph, context: ir.Node, softmax: ir.Node) -> AttentionBlock | None:
    """ModernBERT's attention: V is one part of a fused projection, reached from the context
    MatMul up through Squeeze, Split, Transpose and a Reshape to [B, S, 3, H, d]; Q and K are the
    other parts (rotary embeddings between them and the scores act within each head)."""
    tensor, split = context.inputs[1], None
    for _ in range(6):
        node = tensor.producer() if tensor is not None else None
        if node is None or node.op_type not in ("Squeeze", "Split", "Transpose", "Reshape"):
            return None
        if node.op_type == "Reshape":
            split = node
            break
        tensor = node.inputs[0]
    projection = split.inputs[0].producer() if split is not None and split.inputs[0] is not None else None
    if split is None or projection is None:
        return None
    bias = None
    if projection.op_type == "Add":  # a biased Wqkv (attention_bias=True)
        bias = next((i.name for i in projection.inputs if i is not None and matrix(i, 1)), None)
        projection = next((i.producer() for i in projection.inputs if i is not None and not i.is_initializer()), None)
    weight = g.weight_of(projection) if projection is not None else None
    parts = [_head_axis_value(split, i) for i in range(5)]
    merge = _walk_down_to_output(g, context.outputs[0])
    if weight is None or parts[2] != 3 or parts[3] is None or parts[4] is None or merge is None:
        return None
    out = g.weight_of(merge[1])
    if out is None or g.dims(weight)[1] != 3 * parts[3] * parts[4]:
        return None
    return AttentionBlock(layer=0, q=(weight, bias), k=(weight, bias), v=(weight, bias), out=out,
                          out_bias=g.bias_after(merge[1]), split_reshapes=[split.name or ""],
                          merge_reshape=merge[0].name or "", context=context.outputs[0].name or "",
                          num_heads=parts[3], head_dim=parts[4], fused=True)


def _head_biases(g: Graph, scores: ir.Node, softmax: ir.Node, num_heads: int) -> list[tuple[str, int]]:
    """The Adds between Q·Kᵀ and the Softmax whose other operand is a per-head bias: one read from
    a [buckets, heads] embedding (MPNet's relative positions). The padding mask broadcasts over
    heads and is not one."""
    found, tensor = [], softmax.inputs[0]
    for _ in range(6):
        node = tensor.producer() if tensor is not None else None
        if node is None or node is scores:
            break
        on_path = [i for i in node.inputs if i is not None and not is_weight(i) and _reaches(i, scores)]
        if node.op_type == "Add":
            for index, value in enumerate(node.inputs):
                if value is not None and value not in on_path and _from_head_table(value, num_heads):
                    found.append((node.name or "", index))
        if len(on_path) != 1:
            break
        tensor = on_path[0]
    return found


def _reaches(value: ir.Value, target: ir.Node, depth: int = 6) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    return node is target or any(i is not None and _reaches(i, target, depth - 1) for i in node.inputs)


def _from_head_table(value: ir.Value, num_heads: int) -> bool:
    """Whether `value` is computed from a Gather on a [rows, num_heads] initializer."""
    queue, seen = deque([(value, 0)]), set()
    while queue:
        tensor, depth = queue.popleft()
        node = tensor.producer()
        if node is None or id(node) in seen or depth > 8:
            continue
        seen.add(id(node))
        if node.op_type == "Gather" and matrix(node.inputs[0], 2) and _dims(node.inputs[0])[1] == num_heads:
            return True
        queue.extend((i, depth + 1) for i in node.inputs if i is not None and not i.is_initializer())
    return False


def _dims(value: ir.Value | None) -> tuple[int, ...]:
    assert value is not None and value.const_value is not None
    return tuple(value.const_value.shape.numpy())


def _find_scores_matmul(g: Graph, softmax: ir.Node) -> ir.Node | None:
    """The Q·Kᵀ MatMul feeding a Softmax through mask Add / scale Mul or Div."""
    queue = deque([(softmax.inputs[0], 0)])
    while queue:
        tensor, depth = queue.popleft()
        node = tensor.producer() if tensor is not None else None
        if node is None or depth > 4:
            continue
        if node.op_type == "MatMul" and g.weight_of(node) is None:
            return node
        if node.op_type in {"Add", "Mul", "Div", "Where", "Cast"}:
            queue.extend((i, depth + 1) for i in node.inputs if not is_weight(i))
    return None


def _walk_down_to_output(g: Graph, tensor: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """From the context (softmax @ V) through Transpose to the merging Reshape and the output
    projection MatMul."""
    reshape = None
    for _ in range(4):
        # Shape nodes only read the dimensions (dynamic reshapes in ELECTRA's export): not a path.
        consumers = [c for c in tensor.consumers() if c.op_type != "Shape"]
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op_type == "Reshape":
            reshape = node
        elif g.weight_of(node) is not None:
            return (reshape, node) if reshape is not None else None
        elif node.op_type != "Transpose":
            return None
        tensor = node.outputs[0]
    return None
