"""Find an encoder's FFN blocks in an ONNX graph by structure, not by names, and check the
blocks found (here and in `pipeline.graph.attention`) against the model's config.

Exporters name weights `onnx::MatMul_NNN` and tools like onnxslim rename or share nodes, so the
blocks are found by shape of the graph: an FFN is MatMul(W1) -> Add(b1) -> elementwise GELU ->
MatMul(W2) with W2 rows == W1 columns (or W1's first half, for a gated FFN). Written here because
no library exposes this for ONNX encoder graphs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from pipeline.families import config_size
from pipeline.graph.model import constant, set_weight

if TYPE_CHECKING:
    from pipeline.graph.attention import AttentionBlock

# Elementwise ops of the activations exporters emit: erf GELU, tanh GELU, the Gelu op, ReLU.
GELU_OPS = {"Div", "Erf", "Add", "Mul", "Gelu", "FastGelu", "BiasGelu", "Pow", "Tanh", "Sigmoid", "Sub", "Relu", "Cast"}
# An FFN path passes one of these; a decomposed LayerNorm (opset < 17) is elementwise too, but
# linear, so requiring one keeps the walk from running on into the next layer's projections.
NONLINEAR_OPS = {"Erf", "Gelu", "FastGelu", "BiasGelu", "Tanh", "Sigmoid", "Relu"}


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
        return value.name if value is not None and matrix(value, 2) else None

    def bias_after(self, node: ir.Node) -> str | None:
        """The 1-D initializer of the Add that directly consumes `node`'s output, if any."""
        for consumer in node.outputs[0].consumers():
            if consumer.op_type == "Add":
                for value in consumer.inputs:
                    if matrix(value, 1):
                        return value.name  # type: ignore[union-attr]
        return None


def matrix(value: ir.Value | None, ndim: int) -> bool:
    return (value is not None and value.is_initializer() and value.const_value is not None
            and len(value.const_value.shape) == ndim)


def is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer()


def order_of(graph: ir.Graph) -> dict[int, int]:
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


def find_ffn_blocks(g: Graph) -> list[FfnBlock]:
    blocks = []
    order = order_of(g.graph)
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
        q_cols = g.dims(block.q[0])[1] // (3 if block.fused else 1)
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
