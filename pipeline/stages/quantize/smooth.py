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
import onnx
from onnx import helper, numpy_helper

from pipeline.errors import ArtifactError
from pipeline.graph.bert import Graph
from pipeline.graph.proof import drop_dead
from pipeline.graph.rewrites import untie_identities
from pipeline.parity.runners import session_with_outputs

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


def smoothing_sites(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Normalisation output -> the projection weights that read it: on an unfused BERT the Q, K, V
    and first FFN MatMuls, on a fused one the packed QKV of `Attention` and the FFN MatMul."""
    init = {i.name: i for i in model.graph.initializer}
    produced = {n.output[0]: n for n in model.graph.node if n.op_type in NORMALIZATIONS and n.output}
    sites: dict[str, list[str]] = {}
    for node in model.graph.node:
        if (node.op_type in PROJECTIONS and len(node.input) >= 2 and node.input[0] in produced
                and node.input[1] in init and len(init[node.input[1]].dims) == 2):
            sites.setdefault(node.input[0], []).append(node.input[1])
    return sites


def smooth(model: onnx.ModelProto, batches: list[Batch], alpha: float = 0.5) -> tuple[onnx.ModelProto, SmoothReport]:
    """A smoothed copy of `model` (see the module docstring); `model` is not modified."""
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    # Exporters forward equal tensors (a LayerNorm's ones and zeros straight from initialisation)
    # through Identity nodes; smoothing rewrites each LayerNorm's gamma and beta, so each gets its own.
    untie_identities(smoothed)
    report = SmoothReport(alpha)
    sites = smoothing_sites(smoothed)
    if not sites:
        return smoothed, report
    act_max = _activation_max(model, list(sites), batches)
    g = Graph(smoothed)
    graph_outputs = {o.name for o in smoothed.graph.output}
    producer = {o: n for n in smoothed.graph.node for o in n.output}
    weight_uses: dict[str, int] = {}
    for node in smoothed.graph.node:
        for name in node.input:
            weight_uses[name] = weight_uses.get(name, 0) + 1
    for tensor, weights in sites.items():
        norm = producer[tensor]
        gamma_at, beta_at = NORMALIZATIONS[norm.op_type]
        if (tensor in graph_outputs or any(weight_uses.get(w, 0) != 1 for w in weights)
                or len(norm.input) <= beta_at or not norm.input[beta_at]):
            report.skipped.append(tensor)  # a graph output, a shared weight or a normalisation without beta
            continue
        w_max = np.max([np.abs(g.array(w)).max(axis=1) for w in weights], axis=0)
        scale = (np.maximum(act_max[tensor], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(np.float32)
        scale = np.clip(scale, 1e-2, 1e2)
        for w in weights:
            g.set_array(w, g.array(w) * scale[:, None])
        for i, suffix in ((gamma_at, "gamma"), (beta_at, "beta")):  # own copies: they may be shared
            name = f"{tensor}.smooth.{suffix}"
            smoothed.graph.initializer.append(numpy_helper.from_array(g.array(norm.input[i]) / scale, name))
            norm.input[i] = name
        _restore_for_other_readers(smoothed, tensor, set(weights), scale)
        g.reindex()
        report.smoothed.append({"tensor": tensor, "weights": len(weights),
                                "activation_max_before": float(act_max[tensor].max()),
                                "activation_max_after": float((act_max[tensor] / scale).max())})
    drop_dead(smoothed)
    report.max_abs_diff = _check_equivalent(model, smoothed, batches[:1])
    return smoothed, report


def _restore_for_other_readers(model: onnx.ModelProto, tensor: str, weights: set[str], scale: np.ndarray) -> None:
    """Every reader of `tensor` except the smoothed projections reads tensor * scale."""
    readers = [n for n in model.graph.node if tensor in n.input
               and not (n.op_type in PROJECTIONS and n.input[0] == tensor and n.input[1] in weights)]
    if not readers:
        return
    restored, scale_name = f"{tensor}.smooth.restored", f"{tensor}.smooth.scale"
    model.graph.initializer.append(numpy_helper.from_array(scale, scale_name))
    for node in readers:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = restored
    mul = helper.make_node("Mul", [tensor, scale_name], [restored], name=f"{tensor}.smooth.restore")
    position = next(i for i, n in enumerate(model.graph.node) if tensor in n.output) + 1
    model.graph.node.insert(position, mul)


def _activation_max(model: onnx.ModelProto, tensors: list[str], batches: list[Batch]) -> dict[str, np.ndarray]:
    """Per channel max |value| of each tensor over the non-padding tokens of `batches`."""
    session = session_with_outputs(model, tensors)
    feeds = {i.name for i in session.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for batch in batches:
        mask = batch["attention_mask"].astype(bool)
        for name, value in zip(tensors, session.run(tensors, {k: v for k, v in batch.items() if k in feeds}), strict=True):
            m = np.abs(value[mask]).max(axis=0)
            out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def _check_equivalent(before: onnx.ModelProto, after: onnx.ModelProto, batches: list[Batch]) -> float:
    import onnxruntime as ort

    worst = 0.0
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (before, after)]
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
    model, report = smooth(onnx.load(str(src)), batches, alpha)
    onnx.save(model, str(out))
    return report
