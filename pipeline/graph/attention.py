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
from collections.abc import Iterator
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
    # DeBERTa's head counts written into its shape arithmetic: (node, input index, element index)
    # of each constant element that holds the number of heads.
    head_counts: list[tuple[str, int, int]] = field(default_factory=list)
    # DeBERTa's query and key projections applied to the relative positions: (role, (weight,
    # bias)) of each, its own copy of the layer's query or key weight after untying.
    position_projections: list[tuple[str, tuple[str, str | None]]] = field(default_factory=list)

    @property
    def head_axis(self) -> int:
        """The axis of the head count in the splitting Reshapes' target shape."""
        return 3 if self.fused else 2

    def projections(self) -> list[tuple[str, str | None]]:
        """The distinct (weight, bias) projections that make Q, K and V (and DeBERTa's position
        projections, copies of Q's and K's)."""
        return [self.q] if self.fused else [self.q, self.k, self.v, *(p for _, p in self.position_projections)]

    def roles(self) -> list[tuple[str, str]]:
        """(role, weight) of each projection: "q", "k", "v", and "q" or "k" for a position copy."""
        if self.fused:
            return [("q", self.q[0])]
        return [("q", self.q[0]), ("k", self.k[0]), ("v", self.v[0]),
                *((role, weight) for role, (weight, _) in self.position_projections)]

    def qkv_columns(self, keep: list[int]) -> np.ndarray:
        """The columns of each projection that hold heads `keep` (every third of a fused one)."""
        cols = np.concatenate([np.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in keep])
        width = self.num_heads * self.head_dim
        return np.concatenate([cols + part * width for part in range(3)]) if self.fused else cols


def _walk_up_to_projection(g: Graph, tensor: ir.Value | None,
                           repeats: bool = False) -> tuple[ir.Node, list[ir.Node]] | None:
    """From an attention operand up through Transpose/Reshape/scale/bias to its weighted MatMul
    (with `repeats`, through the Tile or Expand that repeats DeBERTa's position projections over
    the batch too). Returns that MatMul and the Reshape nodes passed on the way."""
    reshapes: list[ir.Node] = []
    for _ in range(10):
        node = tensor.producer() if tensor is not None else None
        if node is None:
            return None
        if g.weight_of(node) is not None:
            return node, reshapes
        if repeats and node.op_type in ("Tile", "Expand"):
            tensor = node.inputs[0]
            continue
        if node.op_type not in PATH_OPS:
            return None
        if node.op_type == "Reshape":
            reshapes.append(node)
            tensor = node.inputs[0]
            continue
        # Follow the operand that carries activations, not the scale or bias constant.
        through = PATH_OPS | {"MatMul"} | ({"Tile", "Expand"} if repeats else set())
        candidates = [i for i in node.inputs if i is not None and not i.is_initializer()
                      and (p := i.producer()) is not None and p.op_type in through]
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


def find_attention_blocks(g: Graph, num_heads: int = 0) -> list[AttentionBlock]:
    """The attention blocks of `g` in layer order; `num_heads` (the config's) finds DeBERTa's,
    whose head count is only in its shape arithmetic."""
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
        if len(contexts) != 1 and num_heads:
            disentangled = _disentangled_block(g, softmax, num_heads)
            if disentangled is not None:
                blocks.append((order[id(softmax)], disentangled))
            continue
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


def _disentangled_block(g: Graph, softmax: ir.Node, num_heads: int) -> AttentionBlock | None:
    """DeBERTa's attention: heads folded into the batch ([B*H, S, d]) around the Softmax, which a
    Reshape separates from the context MatMul; the query and key projections are also applied to
    the relative-position embeddings (content-to-position and position-to-content scores), so one
    slice of their weights removes a head from both paths. Its head count is written as constants
    in the layer's shape arithmetic (the splits, the [-1, H, S, S] views, B*H / H for the position
    terms' repeat): each element equal to `num_heads` in the layer's Reshape shapes, shape Concats
    and Divs is recorded, to be set to the kept count."""
    down = [c for c in softmax.outputs[0].consumers() if c.op_type != "Shape"]  # Shape only reads dimensions
    if len(down) != 1 or down[0].op_type != "Reshape":
        return None
    contexts = [c for c in down[0].outputs[0].consumers() if c.op_type == "MatMul" and g.weight_of(c) is None]
    if len(contexts) != 1:
        return None
    context = contexts[0]
    scores = _nearest_matmul(g, softmax)
    v = _walk_up_to_projection(g, context.inputs[1])
    merge = _walk_down_to_output(g, context.outputs[0])
    if scores is None or v is None or merge is None:
        return None
    q, k = _walk_up_to_projection(g, scores.inputs[0]), _walk_up_to_projection(g, scores.inputs[1])
    views = [c for c in context.outputs[0].consumers() if c.op_type == "Reshape"]
    out = g.weight_of(merge[1])
    if q is None or k is None or out is None or len(views) != 1:
        return None
    projections = [(g.weight_of(node), g.bias_after(node)) for node, _ in (q, k, v)]
    weights = [w for w, _ in projections]
    if None in weights or len(set(weights)) != 3 or g.dims(weights[0])[1] % num_heads:  # type: ignore[arg-type]
        return None
    positions = _position_projections(g, softmax, scores, projections[0][0], projections[1][0])  # type: ignore[arg-type]
    if positions is None:
        return None
    head_dim = g.dims(weights[0])[1] // num_heads  # type: ignore[arg-type]
    counts = _head_count_constants(g, [*weights, *(w for _, (w, _) in positions)], merge[1], num_heads)  # type: ignore[list-item]
    if not counts:
        return None
    return AttentionBlock(
        layer=0, q=projections[0], k=projections[1], v=projections[2], out=out,  # type: ignore[arg-type]
        out_bias=g.bias_after(merge[1]), merge_reshape=merge[0].name or "",
        context=views[0].outputs[0].name or "", num_heads=num_heads, head_dim=head_dim, head_counts=counts,
        position_projections=positions)


def _score_matmuls(g: Graph, softmax: ir.Node) -> Iterator[ir.Node]:
    """The weightless MatMuls above a Softmax, nearest first, through the mask, the scale, the
    added position terms (gathered by relative position) and the [B*H] <-> [B, H] views: Q·Kᵀ
    first, then DeBERTa's content-to-position and position-to-content scores."""
    queue, seen = deque([(softmax.inputs[0], 0)]), set()
    while queue:
        tensor, depth = queue.popleft()
        node = tensor.producer() if tensor is not None else None
        if node is None or depth > 10 or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMul" and g.weight_of(node) is None:
            yield node
        elif node.op_type in {"Add", "Mul", "Div", "Where", "Cast", "Reshape", "GatherElements", "Transpose"}:
            data_only = node.op_type in ("Reshape", "GatherElements")  # not the shape, not the indices
            queue.extend((i, depth + 1) for i in node.inputs[:1 if data_only else None] if i is not None and not is_weight(i))


def _nearest_matmul(g: Graph, softmax: ir.Node) -> ir.Node | None:
    """The Q·Kᵀ MatMul of a Softmax."""
    return next(_score_matmuls(g, softmax), None)


def _position_projections(g: Graph, softmax: ir.Node, scores: ir.Node, q: str,
                          k: str) -> list[tuple[str, tuple[str, str | None]]] | None:
    """The projections of the relative positions feeding the other score MatMuls (content-to-
    position, position-to-content): each must equal this layer's query or key weight (a copy
    untying made), whose role it takes. None when one is neither."""
    found: list[tuple[str, tuple[str, str | None]]] = []
    for node in _score_matmuls(g, softmax):
        if node is scores:
            continue
        for operand in node.inputs:
            walk = _walk_up_to_projection(g, operand, repeats=True)
            weight = g.weight_of(walk[0]) if walk is not None else None
            if walk is None or weight is None:
                return None
            if weight in (q, k):
                continue
            same = [role for role, name in (("q", q), ("k", k)) if g.dims(name) == g.dims(weight)
                    and np.array_equal(g.array(name), g.array(weight))]
            if not same:
                return None
            found.append((same[0], (weight, g.bias_after(walk[0]))))
    return found


def _head_count_constants(g: Graph, weights: list[str], out_projection: ir.Node,
                          num_heads: int) -> list[tuple[str, int, int]]:
    """Every element equal to `num_heads` in the int64 constants of the Reshape shapes (their head
    axis, 2), shape Concats and Divs downstream of this layer's Q, K and V projections (both their
    content and position uses) and up to its output projection."""
    starts = [c for w in weights for c in g.init[w].consumers()]
    region: set[int] = set()
    queue = deque(starts)
    found: list[tuple[str, int, int]] = []
    while queue:
        node = queue.popleft()
        if id(node) in region or node is out_projection:
            continue
        region.add(id(node))
        for index, value in enumerate(node.inputs):
            array = constant(value) if value is not None else None
            if array is None or array.dtype != np.int64 or array.ndim > 1 or array.size > 4:
                continue
            if node.op_type == "Reshape" and index == 1:
                positions = [2] if array.size == 4 and array[2] == num_heads else []
            elif node.op_type in ("Concat", "Div"):
                positions = [i for i, element in enumerate(array.reshape(-1)) if element == num_heads]
            else:
                positions = []
            found.extend((node.name or "", index, p) for p in positions)
        for output in node.outputs:
            queue.extend(output.consumers())
    return found


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
