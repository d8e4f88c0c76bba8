"""Find BERT's attention and FFN blocks in an ONNX graph by structure, not by names.

Exporters name weights `onnx::MatMul_NNN` and tools like onnxslim rename or share nodes, so the
blocks are found by shape of the graph: an FFN is MatMul(W1) -> Add(b1) -> elementwise GELU ->
MatMul(W2) with W2 rows == W1 columns; an attention block is found from its Softmax, walking up
to the Q/K MatMuls and the V MatMul, and down to the head-merging Reshape and the output
MatMul. Written here because no library exposes this for ONNX BERT graphs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pipeline.families import config_size
from pipeline.graph.model import constant, set_weight

# Elementwise ops of the activations exporters emit: erf GELU, tanh GELU, the Gelu op, ReLU.
GELU_OPS = {"Div", "Erf", "Add", "Mul", "Gelu", "FastGelu", "BiasGelu", "Pow", "Tanh", "Sigmoid", "Sub", "Relu", "Cast"}
# An FFN path passes one of these; a decomposed LayerNorm (opset < 17) is elementwise too, but
# linear, so requiring one keeps the walk from running on into the next layer's projections.
NONLINEAR_OPS = {"Erf", "Gelu", "FastGelu", "BiasGelu", "Tanh", "Sigmoid", "Relu"}
PATH_OPS = {"Transpose", "Reshape", "Add", "Mul", "Div"}


class Graph:
    """A BERT graph on the one graph model (`pipeline.graph.model`): its weights by name, and the
    MatMul-weight and bias patterns the block finders read. Holds no index of its own: producers
    and consumers come from onnx-ir, so rewrites need no re-sync."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph

    @property
    def init(self) -> Mapping[str, ir.Value]:
        return self.graph.initializers

    def array(self, name: str) -> np.ndarray:
        return self.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]

    def set_array(self, name: str, value: np.ndarray) -> None:
        set_weight(self.graph.initializers[name], value)

    def dims(self, name: str) -> tuple[int, ...]:
        tensor = self.graph.initializers[name].const_value
        assert tensor is not None
        return tuple(tensor.shape.numpy())

    def weight_of(self, node: ir.Node) -> str | None:
        """The 2-D initializer input of a MatMul, if it has one."""
        if node.op_type != "MatMul" or len(node.inputs) < 2:
            return None
        value = node.inputs[1]
        return value.name if value is not None and _matrix(value, 2) else None

    def bias_after(self, node: ir.Node) -> str | None:
        """The 1-D initializer of the Add that directly consumes `node`'s output, if any."""
        for consumer in node.outputs[0].consumers():
            if consumer.op_type == "Add":
                for value in consumer.inputs:
                    if _matrix(value, 1):
                        return value.name  # type: ignore[union-attr]
        return None


def _matrix(value: ir.Value | None, ndim: int) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and len(value.const_value.shape) == ndim)


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer()


def _order(graph: ir.Graph) -> dict[int, int]:
    return {id(n): i for i, n in enumerate(graph)}


@dataclass
class FfnBlock:
    layer: int
    w1: str
    b1: str | None  # None when the graph has no first bias (an all-zero one folded away)
    w2: str
    b2: str | None
    activation: str  # the GELU output, W2's input
    size: int
    # A gated FFN (ModernBERT): W1 makes 2 x size columns, split in halves into the input of the
    # activation and its gate; neuron j is columns j and size + j of W1 and row j of W2.
    gated: bool = False

    def w1_columns(self, keep: np.ndarray) -> np.ndarray:
        """W1's columns that hold neurons `keep` (both halves of a gated FFN)."""
        return np.concatenate([keep, keep + self.size]) if self.gated else keep


@dataclass
class AttentionBlock:
    layer: int
    q: tuple[str, str]  # (weight, bias)
    k: tuple[str, str]
    v: tuple[str, str]
    out: str  # output projection weight
    out_bias: str | None = None
    split_reshapes: list[str] = field(default_factory=list)  # node names
    merge_reshape: str = ""
    context: str = ""  # softmax @ V, [batch, heads, seq, head_dim]
    num_heads: int = 0
    head_dim: int = 0


def find_ffn_blocks(g: Graph) -> list[FfnBlock]:
    blocks = []
    order = _order(g.graph)
    for node in g.graph:
        w1 = g.weight_of(node)
        if w1 is None:
            continue
        b1 = g.bias_after(node)
        size = g.dims(w1)[1]
        if b1 is not None and g.dims(b1)[0] != size:
            continue
        # Without a bias (onnxsim folds away an all-zero one), the GELU reads the MatMul itself.
        start = next(c for c in node.outputs[0].consumers() if c.op_type == "Add").outputs[0] if b1 else node.outputs[0]
        found, gated = _walk_gelu_to_matmul(g, start, size), False
        halves = _gated_halves(start)
        if found is None and halves is not None and size % 2 == 0:
            found, gated = _walk_gelu_to_matmul(g, halves, size // 2), True
        if found is not None:
            w2_node, activation = found
            w2 = g.weight_of(w2_node)
            assert w2 is not None and activation.name
            block = FfnBlock(0, w1, b1, w2, g.bias_after(w2_node), activation.name, size // 2 if gated else size, gated)
            blocks.append((order[id(node)], block))
    blocks.sort(key=lambda item: item[0])
    for i, (_, block) in enumerate(blocks):
        block.layer = i
    return [block for _, block in blocks]


def _gated_halves(tensor: ir.Value) -> ir.Value | None:
    """The first half of a gated FFN's W1 output: two `Slice` nodes split it (ModernBERT's chunk(2)),
    the one starting at 0 feeds the activation. None for any other FFN."""
    slices = [c for c in tensor.consumers() if c.op_type == "Slice"]
    if len(slices) != 2 or any(c.op_type not in ("Slice", "Shape") for c in tensor.consumers()):
        return None
    for node in slices:
        start = constant(node.inputs[1])
        if start is not None and not start.any():
            return node.outputs[0]
    return None


def _walk_gelu_to_matmul(g: Graph, start: ir.Value, size: int) -> tuple[ir.Node, ir.Value] | None:
    """From the biased FFN input, through elementwise GELU ops only (at least one nonlinear), to a
    MatMul whose weight has `size` rows. Returns (that MatMul, its activation input) or None."""
    queue, seen = deque([(start, 0, False)]), set()
    while queue:
        tensor, depth, nonlinear = queue.popleft()
        for consumer in tensor.consumers():
            # GELU reads x twice (x * erf(x)): the same node is reached before and after the
            # nonlinearity, so "seen" is per (node, flag).
            if (id(consumer), nonlinear) in seen:
                continue
            seen.add((id(consumer), nonlinear))
            weight = g.weight_of(consumer)
            if weight is not None and nonlinear and g.dims(weight)[0] == size:
                return consumer, tensor
            if consumer.op_type in GELU_OPS and depth < 8:
                queue.append((consumer.outputs[0], depth + 1, nonlinear or consumer.op_type in NONLINEAR_OPS))
    return None


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
    order = _order(g.graph)
    for softmax in (n for n in g.graph if n.op_type == "Softmax"):
        scores = _find_scores_matmul(g, softmax)
        contexts = [c for c in softmax.outputs[0].consumers() if c.op_type == "MatMul"]
        if scores is None or len(contexts) != 1:
            continue
        context = contexts[0]
        q = _walk_up_to_projection(g, scores.inputs[0])
        k = _walk_up_to_projection(g, scores.inputs[1])
        v = _walk_up_to_projection(g, context.inputs[1])
        merge = _walk_down_to_output(g, context.outputs[0])
        if q is None or k is None or v is None or merge is None:
            continue
        merge_reshape, out_node = merge
        out = g.weight_of(out_node)
        projections: list[tuple[str, str]] = []
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
            num_heads=num_heads, head_dim=head_dim,
        )
        blocks.append((order[id(softmax)], block))
    blocks.sort(key=lambda item: item[0])
    for i, (_, block) in enumerate(blocks):
        block.layer = i
    return [b for _, b in blocks]


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
            queue.extend((i, depth + 1) for i in node.inputs if not _is_weight(i))
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


def config_sizes(config: dict) -> dict[str, int]:
    """Layers, heads, hidden and FFN sizes from a HF config, under the family's own keys."""
    return {"layers": config_size(config, "num_hidden_layers"), "heads": config_size(config, "num_attention_heads"),
            "hidden": config_size(config, "hidden_size"), "intermediate": config_size(config, "intermediate_size")}


def check_blocks(g: Graph, ffn: list[FfnBlock], attention: list[AttentionBlock], config: dict) -> list[str]:
    """What the found blocks contradict in `config` (empty when they agree, or no config is given)."""
    sizes = config_sizes(config)
    problems = []
    # No attention blocks at all is a family whose attention is not BERT's (DeBERTa), pruned in its FFN only.
    if sizes["layers"] and (len(ffn) != sizes["layers"] or (attention and len(attention) != sizes["layers"])):
        problems.append(f"config has {sizes['layers']} layers, the graph {len(ffn)} FFN and "
                        f"{len(attention)} attention blocks")
    head_dim = sizes["hidden"] // sizes["heads"] if sizes["heads"] and sizes["hidden"] else 0
    for block in attention:
        q_cols = g.dims(block.q[0])[1]
        if block.num_heads * block.head_dim != q_cols:
            problems.append(f"layer {block.layer}: {block.num_heads} heads x {block.head_dim} != {q_cols} Q columns")
        if head_dim and block.head_dim != head_dim:
            problems.append(f"layer {block.layer}: head size {block.head_dim}, config says {head_dim}")
        if sizes["heads"] and block.num_heads > sizes["heads"]:
            problems.append(f"layer {block.layer}: {block.num_heads} heads, config says {sizes['heads']}")
    for block in ffn:
        if sizes["intermediate"] and block.size > sizes["intermediate"]:
            problems.append(f"layer {block.layer}: FFN size {block.size} > config's {sizes['intermediate']}")
    return problems
