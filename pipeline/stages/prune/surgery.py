"""Graph surgery: slicing FFN neurons and attention heads out of an ONNX BERT, and 2:4 sparsity.

Removing heads slices Q/K/V columns and biases and W_o rows, and patches the head-count and
all-head-size constants of that layer's Reshapes. Those constants may be shared across layers
(onnxslim, ORT's basic optimizer), so each layer gets its own clone before it is patched.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pipeline.graph.attention import AttentionBlock
from pipeline.graph.bert import FfnBlock, Graph
from pipeline.graph.model import add_initializer, constant, drop_dead, unique_name
from pipeline.parity.policy import PRUNED_MARK, pruned_mark
from pipeline.stages.prune.plan import LayerPlan, PruningPlan, mask_24
from pipeline.stages.prune.scores import PruneError, Scores

Batch = dict[str, np.ndarray]


def _patch_shape(g: Graph, reshape: ir.Node, index: int, value: int) -> None:
    """Give this Reshape its own shape with element `index` set to `value`."""
    shape = reshape.inputs[1]
    assert shape is not None
    fixed = constant(shape)
    if fixed is not None:
        patched = fixed.copy()
        patched[index] = value
        reshape.replace_input_with(1, add_initializer(g.graph, patched, f"{shape.name}_{reshape.name}_pruned"))
        return
    concat = shape.producer()
    part = constant(concat.inputs[index]) if concat is not None else None
    if concat is None or part is None:
        raise PruneError(f"Reshape {reshape.name}: its shape part is not a constant; "
                         "prune an unfused FP32 export from shipyard export")
    # Shared across layers by some optimizers: patch a clone, never the original.
    part_value = add_initializer(g.graph, np.full(part.shape, value, dtype=part.dtype),
                                 f"{concat.name}_{reshape.name}_pruned_value")
    inputs = [part_value if i == index else v for i, v in enumerate(concat.inputs)]
    clone = ir.Node(concat.domain, "Concat", inputs, attributes=list(concat.attributes.values()),
                    name=unique_name(g.graph, f"{concat.name}_{reshape.name}_pruned"))
    clone.outputs[0].name = unique_name(g.graph, f"{concat.outputs[0].name}_{reshape.name}_pruned")
    g.graph.insert_after(concat, clone)
    reshape.replace_input_with(1, clone.outputs[0])


def remove_heads(g: Graph, block: AttentionBlock, heads: list[int], context_mean: np.ndarray | None
                 ) -> np.ndarray | None:
    """Slice the heads out; returns the output bias compensation wrote (None: untouched)."""
    keep = [h for h in range(block.num_heads) if h not in heads]
    cols = np.concatenate([np.arange(h * block.head_dim, (h + 1) * block.head_dim) for h in keep])
    qkv_cols = block.qkv_columns(keep)
    folded = None
    if context_mean is not None and block.out_bias is not None:
        w_out = g.array(block.out).reshape(block.num_heads, block.head_dim, -1)
        g.set_array(block.out_bias, g.array(block.out_bias) + sum(context_mean[h] @ w_out[h] for h in heads))
        folded = g.array(block.out_bias)
    for weight, bias in block.projections():
        g.set_array(weight, g.array(weight)[:, qkv_cols])
        if bias is not None:
            g.set_array(bias, g.array(bias)[qkv_cols])
    g.set_array(block.out, g.array(block.out)[cols, :])
    nodes = {n.name: n for n in g.graph}
    for name in block.split_reshapes:
        _patch_shape(g, nodes[name], block.head_axis, len(keep))
    _patch_shape(g, nodes[block.merge_reshape], 2, len(keep) * block.head_dim)
    for name, index in block.head_biases:
        _slice_head_bias(g, nodes[name], index, keep)
    for name, index, element in block.head_counts:
        _set_head_count(g, nodes[name], index, element, len(keep))
    return folded


def _set_head_count(g: Graph, node: ir.Node, index: int, element: int, value: int) -> None:
    """Give `node` its own copy of constant input `index` with `element` set to `value` (the copy:
    exporters and optimizers share such constants between layers)."""
    array = constant(node.inputs[index])
    assert array is not None
    patched = array.copy()
    patched.reshape(-1)[element] = value
    node.replace_input_with(index, add_initializer(g.graph, patched, f"{node.name}_heads_{index}"))


def _slice_head_bias(g: Graph, add: ir.Node, index: int, keep: list[int]) -> None:
    """This layer reads only the kept heads of a per-head bias the layers share (MPNet's relative
    positions, [B, H, S, S]): a Gather on axis 1 before its Add."""
    bias = add.inputs[index]
    assert bias is not None
    indices = add_initializer(g.graph, np.asarray(keep, dtype=np.int64), f"{add.name}_kept_heads")
    gather = ir.Node("", "Gather", [bias, indices], attributes=[ir.AttrInt64("axis", 1)],
                     name=unique_name(g.graph, f"{add.name}_kept_heads"))
    gather.outputs[0].name = unique_name(g.graph, f"{add.name}_kept_heads_output")
    g.graph.insert_before(add, gather)
    add.replace_input_with(index, gather.outputs[0])


def slice_ffn(g: Graph, block: FfnBlock, keep: np.ndarray, mean: np.ndarray | None) -> np.ndarray | None:
    """Keep the `keep` neurons; returns the W2 bias compensation wrote (None: untouched)."""
    bias = None
    if mean is not None and block.b2 is not None:
        dropped = np.setdiff1d(np.arange(block.size), keep)
        g.set_array(block.b2, g.array(block.b2) + mean[dropped] @ g.array(block.w2)[dropped, :])
        bias = g.array(block.b2)
    g.set_array(block.w1, g.array(block.w1)[:, block.w1_columns(keep)])
    if block.b1 is not None:
        g.set_array(block.b1, g.array(block.b1)[block.w1_columns(keep)])
    g.set_array(block.w2, g.array(block.w2)[keep, :])
    return bias


def sparsify_24(g: Graph, weights: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Keep the 2 largest |w| of every 4 consecutive weights along the reduction axis (rows), by
    the rule the PyTorch side applies too (`pruning_plan.mask_24`); `weights` are (layer, role,
    initializer) and the ones made sparse are returned."""
    done = []
    for layer, role, name in weights:
        w = g.array(name)
        if w.shape[0] % 4:
            continue
        g.set_array(name, w * mask_24(w))
        done.append((layer, role, name))
    return done


def apply(model: ir.Model, ffn: list[FfnBlock], attention: list[AttentionBlock],
          ffn_keep: dict[int, np.ndarray], heads_remove: dict[int, list[int]],
          sparsity: str, compensation: Scores | None = None) -> tuple[ir.Model, list[str], PruningPlan]:
    """A pruned copy of `model`, the 2:4 weights' names and the plan that does the same to the
    PyTorch model; the input is never modified. With `compensation`, removed units' mean
    contributions are folded into the following bias."""
    pruned = model.clone()  # shares the tensors, which surgery replaces and never writes into
    g = Graph(pruned)
    layers = {b.layer: LayerPlan(layer=b.layer, ffn_size=b.size, ffn_keep=[int(i) for i in ffn_keep[b.layer]],
                                 heads_removed=sorted(int(h) for h in heads_remove.get(b.layer, [])))
              for b in ffn}
    for block in ffn:
        if len(ffn_keep[block.layer]) < block.size:
            bias = slice_ffn(g, block, ffn_keep[block.layer],
                             compensation.ffn_mean[block.layer] if compensation else None)
            layers[block.layer].ffn_bias = None if bias is None else bias.tolist()
    for block in attention:
        if heads_remove.get(block.layer):
            bias = remove_heads(g, block, heads_remove[block.layer],
                                compensation.context_mean[block.layer] if compensation else None)
            layers[block.layer].attention_bias = None if bias is None else bias.tolist()
    ffn_weights = [w for b in ffn for w in ((b.layer, "ffn.w1", b.w1), (b.layer, "ffn.w2", b.w2))]
    # A fused Wqkv is one weight: made sparse once, under the role of its first part. DeBERTa's
    # position copies of Q and K are made sparse as Q and K are (the same values, the same mask).
    attention_weights = [w for b in attention for w in (
        *((b.layer, f"attention.{role}", weight) for role, weight in b.roles()), (b.layer, "attention.out", b.out))]
    targets = {"none": [], "ffn": ffn_weights, "attention": attention_weights, "all": ffn_weights + attention_weights}
    done = sparsify_24(g, targets[sparsity])
    sparse = [name for _, _, name in done]
    plan = PruningPlan(layers=[layers[k] for k in sorted(layers)],
                       sparse_24=list(dict.fromkeys((layer, role) for layer, role, _ in done)))
    drop_dead(pruned)
    # Marks the graph as pruned so `shipyard validate` applies the pruned thresholds to it.
    pruned.metadata_props[PRUNED_MARK] = pruned_mark({str(k): v for k, v in heads_remove.items()}, len(sparse))
    return pruned, sparse, plan
