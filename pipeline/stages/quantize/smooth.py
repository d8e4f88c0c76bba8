"""Activation smoothing before INT8 (SmoothQuant, Xiao et al. 2022), for post-LayerNorm BERTs.

A few channels of a LayerNorm's output carry values far larger than the rest, so one per-tensor
INT8 scale for that activation wastes most of its range on them. Smoothing divides each channel j
of the LayerNorm output by s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (X from calibration rows, W
the rows of every projection that reads it) and multiplies row j of those weights by s_j. The
division is folded into the LayerNorm's gamma and beta, so the activation the quantizer sees is
already smoothed and nothing is added in front of the projections.

In a post-LN BERT the same LayerNorm output is also the residual input of the next Add, which must
keep the original values: that Add reads it through one `Mul` by s. So the graph computes exactly
what it did in float (checked to 1e-4 on a calibration batch before the graph is used).

Applied to the LayerNorms that feed the Q, K and V projections (their max |W_j| is taken over the
three) and the FFN's first projection, found by structure (a normalisation's output read by a
MatMul or Attention weight), so it works on the unfused graph (Q/DQ form) and on the graph ONNX
Runtime's transformer optimizer fused (CPU form: SkipLayerNormalization feeding Attention). Written here because ONNX Runtime's SmoothQuant option needs
Intel Neural Compressor and inserts a Mul in front of every projection instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pipeline.errors import ArtifactError
from pipeline.graph import model as graph_model
from pipeline.graph.model import add_initializer, constant, drop_dead, initializer, set_weight
from pipeline.graph.rewrites import untie_constants

Batch = dict[str, np.ndarray]
EXACT = 1e-4


@dataclass
class SmoothReport:
    """What smoothing did: per LayerNorm output, the projections it feeds and the range it had."""

    alpha: float
    smoothed: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "smoothed": self.smoothed, "skipped": self.skipped,
                "float_max_abs_diff": self.max_abs_diff}


# The normalisations whose output is smoothed, and the positions of their gamma and beta inputs:
# the unfused graph's LayerNormalization and the fused ones of ONNX Runtime's transformer optimizer.
NORMALIZATIONS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3), "EmbedLayerNormalization": (5, 6)}
PROJECTIONS = ("MatMul", "Attention")  # read the activation as input 0 and a weight [hidden, out] as input 1


def smoothing_sites(model: ir.Model) -> dict[str, list[str]]:
    """Normalisation output -> the projection weights that read it: on an unfused BERT the Q, K, V
    and first FFN MatMuls, on a fused one the packed QKV of `Attention` and the FFN MatMul."""
    sites: dict[str, list[str]] = {}
    for node in model.graph:
        if node.op_type not in PROJECTIONS or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        if node.op_type == "Attention" and not graph_model.is_packed_attention(node):
            continue  # the standard ONNX Attention reads K and V as activations, not a packed weight
        norm, weight = node.inputs[0].producer(), node.inputs[1]
        if (norm is not None and norm.op_type in NORMALIZATIONS and node.inputs[0] is norm.outputs[0]
                and initializer(weight) is not None and len(weight.shape or ()) == 2):  # type: ignore[union-attr]
            sites.setdefault(node.inputs[0].name or "", []).append(weight.name or "")  # type: ignore[union-attr]
    return sites


def smooth(model: ir.Model, batches: list[Batch], alpha: float = 0.5) -> tuple[ir.Model, SmoothReport]:
    """A smoothed copy of `model` (see the module docstring); `model` is not modified."""
    smoothed = model.clone()  # shares the tensors, which smoothing replaces and never writes into
    # Exporters share equal tensors (a LayerNorm's ones and zeros straight from initialisation)
    # behind Identity nodes or directly; smoothing rewrites each LayerNorm's gamma and beta, so
    # each gets its own.
    untie_constants(smoothed)
    report = SmoothReport(alpha)
    sites = smoothing_sites(smoothed)
    if not sites:
        return smoothed, report
    act_max = _activation_max(model, list(sites), batches)
    graph = smoothed.graph
    values = {v.name: v for node in graph for v in node.outputs}
    for tensor, weights in sites.items():
        activation = values[tensor]
        norm = activation.producer()
        assert norm is not None
        gamma_at, beta_at = NORMALIZATIONS[norm.op_type]
        readers = [graph.initializers[w] for w in weights]
        if (activation.is_graph_output() or any(len(w.uses()) != 1 for w in readers)
                or len(norm.inputs) <= beta_at or norm.inputs[beta_at] is None):
            report.skipped.append(tensor)  # a graph output, a shared weight or a normalisation without beta
            continue
        w_max = np.max([np.abs(initializer(w)).max(axis=1) for w in readers], axis=0)  # type: ignore[arg-type]
        scale = (np.maximum(act_max[tensor], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(np.float32)
        scale = np.clip(scale, 1e-2, 1e2)
        for w in readers:
            set_weight(w, initializer(w) * scale[:, None])
        for i, suffix in ((gamma_at, "gamma"), (beta_at, "beta")):  # own copies: they may be shared
            own = add_initializer(graph, constant(norm.inputs[i]) / scale, f"{tensor}.smooth.{suffix}")
            norm.replace_input_with(i, own)
        _restore_for_other_readers(graph, activation, set(readers), scale)
        report.smoothed.append({"tensor": tensor, "weights": len(weights),
                                "activation_max_before": float(act_max[tensor].max()),
                                "activation_max_after": float((act_max[tensor] / scale).max())})
    drop_dead(smoothed)
    report.max_abs_diff = _check_equivalent(model, smoothed, batches[:1])
    return smoothed, report


def _restore_for_other_readers(graph: ir.Graph, activation: ir.Value, weights: set[ir.Value],
                               scale: np.ndarray) -> None:
    """Every reader of `activation` except the smoothed projections reads activation * scale."""
    uses = [u for u in activation.uses()
            if not (u.node.op_type in PROJECTIONS and u.idx == 0 and u.node.inputs[1] in weights)]
    if not uses:
        return
    name = activation.name
    scale_value = add_initializer(graph, scale, f"{name}.smooth.scale")
    mul = ir.Node("", "Mul", [activation, scale_value], name=f"{name}.smooth.restore")
    mul.outputs[0].name = f"{name}.smooth.restored"
    for use in uses:
        use.node.replace_input_with(use.idx, mul.outputs[0])
    graph.insert_after(activation.producer(), mul)  # type: ignore[arg-type]


def _activation_max(model: ir.Model, tensors: list[str], batches: list[Batch]) -> dict[str, np.ndarray]:
    """Per channel max |value| of each tensor over the non-padding tokens of `batches`."""
    session = graph_model.session(model, tensors)
    feeds = {i.name for i in session.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for batch in batches:
        mask = batch["attention_mask"].astype(bool)
        for name, value in zip(tensors, session.run(tensors, {k: v for k, v in batch.items() if k in feeds}), strict=True):
            m = np.abs(value[mask]).max(axis=0)
            out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def _check_equivalent(before: ir.Model, after: ir.Model, batches: list[Batch]) -> float:
    worst = 0.0
    sessions = [graph_model.session(m) for m in (before, after)]
    feeds = {i.name for i in sessions[0].get_inputs()}
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k in feeds}
        a, b = (s.run(None, inputs) for s in sessions)
        scale = max(1.0, max(float(np.abs(x).max()) for x in a))
        worst = max(worst, max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) / scale)
    if worst > EXACT:
        raise ArtifactError(f"activation smoothing changed the float graph's outputs by {worst:.3g} (relative, > "
                            f"{EXACT}); this graph's LayerNorm/projection pattern is not one smoothing handles; "
                            "turn stages.quantize.smoothing off")
    return worst


def smooth_file(src: Path, out: Path, batches: list[Batch], alpha: float) -> SmoothReport:
    model, report = smooth(graph_model.load(src), batches, alpha)
    graph_model.save(model, out)
    return report
