"""Which nodes a float16 graph keeps in float32, found by structure (not names).

ONNX Runtime's float16 converter keeps whole op types in float32 (`op_block_list`, the LayerNorms
and Softmax of `pipeline.stages.trt_onnx`) or named nodes (`node_block_list`). These are the named
nodes, three kinds of them, each a computation float16 gets wrong:

- **Index arithmetic**: float computations that end in a cast to an integer type (DeBERTa's log
  buckets of relative positions: `log(|i - j| / mid) / log(max / mid) * (mid - 1)`, rounded up).
  In float16 a bucket lands one off and the model reads the wrong position embedding.
- **Rotary angles**: positions times inverse frequencies, and their Sin and Cos (ModernBERT). An
  angle of 8,000 radians has no fractional digits left in float16; cos and sin of it are noise.
- **Attention scores** where a family's entry says so (`pipeline.families`, `float32_scores`):
  everything between the Q and K projections and the Softmax. DeBERTa's disentangled scores (QKᵀ
  plus the content-to-position and position-to-content terms) overflow float16 in trained models.

Written here because the converter takes names only and no tool finds these structures.
"""

from __future__ import annotations

from collections import deque

import onnx_ir as ir

# What a float computation on indices or positions passes through.
ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Log", "Exp", "Pow", "Sqrt", "Abs", "Sign", "Neg", "Ceil", "Floor",
              "Round", "Min", "Max", "Clip", "Where", "Reciprocal"}
SHAPING = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Concat", "Slice", "Gather", "Tile"}
# A Constant node's float value (the rotary inverse frequencies) is converted like any node's.
SOURCES = {"Constant", "Cast", "Range"}
INTEGER_TYPES = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT16, ir.DataType.INT8, ir.DataType.UINT8}
# Walks stop at a weighted projection: it stays float16 and its output is cast up.
STOP = {"LayerNormalization", "SkipLayerNormalization", "Softmax"}


def _casts_to(node: ir.Node, types: set[ir.DataType]) -> bool:
    attr = node.attributes.get("to")
    return node.op_type == "Cast" and attr is not None and ir.DataType(attr.as_int()) in types


def _is_projection(node: ir.Node) -> bool:
    return (node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None
            and node.inputs[1].is_initializer())


def _ancestors(starts: list[ir.Node], through: set[str], depth: int) -> set[ir.Node]:
    """`starts` and the nodes above them whose op is in `through`, up to `depth` steps."""
    found: set[ir.Node] = set()
    queue = deque((node, 0) for node in starts)
    while queue:
        node, level = queue.popleft()
        if node in found:
            continue
        found.add(node)
        if level >= depth:
            continue
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type in through and not _is_projection(producer):
                queue.append((producer, level + 1))
    return found


def index_arithmetic(model: ir.Model) -> set[ir.Node]:
    """Float computations that end in a cast to an integer type."""
    casts = [n for n in model.graph if _casts_to(n, INTEGER_TYPES)]
    found = _ancestors(casts, ARITHMETIC | SOURCES, 12)
    return {n for n in found if not _casts_to(n, INTEGER_TYPES) or n in casts}


def rotary_angles(model: ir.Model) -> set[ir.Node]:
    """Sin and Cos and the angle computation above them (positions x inverse frequencies)."""
    trig = [n for n in model.graph if n.op_type in ("Sin", "Cos")]
    return _ancestors(trig, ARITHMETIC | SHAPING | SOURCES | {"MatMul"}, 12) if trig else set()


def attention_scores(model: ir.Model) -> set[ir.Node]:
    """Everything between the projections and each Softmax: the scores and the terms added to them."""
    softmaxes = [n for n in model.graph if n.op_type == "Softmax"]
    found = _ancestors(softmaxes, ARITHMETIC | SHAPING | SOURCES | {"MatMul", "GatherElements"}, 16)
    return {n for n in found if n.op_type not in STOP}


def float32_nodes(model: ir.Model, scores: bool) -> list[str]:
    """The names of the nodes a float16 conversion of `model` keeps in float32 (module docstring)."""
    nodes = index_arithmetic(model) | rotary_angles(model) | (attention_scores(model) if scores else set())
    return sorted(n.name for n in nodes if n.name)
