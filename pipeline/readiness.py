"""Static TensorRT-readiness check of an ONNX file, on CPU, before any GPU is involved.

Written here because no library does it without TensorRT itself: Polygraphy and trtexec need the
`tensorrt` package to parse. The rules are what TensorRT's ONNX parser and its explicit
quantization documentation require, checked on the graph:

- `opset`: the default-domain opset is inside the pinned TensorRT version's range;
- `operator`: every node is in that version's supported ONNX operator list (shipped as data in
  `pipeline/trt_ops/<version>.json`); custom-domain ops (ONNX Runtime's fused ops) are refused;
- `qdq-*`: Q/DQ placement as TensorRT expects: INT8 with zero points 0, constant positive scales,
  per-tensor activations, weights per-channel on the output-channel axis, each Q feeding only DQ,
  each MatMul/Gemm quantized on both inputs or neither, Q only on float tensors;
- `fp16-safe`: in a graph with float16 tensors, LayerNormalization and Softmax compute in float32;
- `dynamic-axes`: graph inputs are [batch, sequence] and their static dims agree with the profiles.

A finding names the node (or input) and the rule; an empty list means ready.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError, ShipyardError
from pipeline.recipe import ProfileSpec

OPS_DIR = Path(__file__).parent / "trt_ops"
DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16"}
INT8 = 3
QUANTIZED_CONSUMERS = ("MatMul", "Gemm")
FP16_SENSITIVE = ("LayerNormalization", "Softmax")


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message} [{self.rule}]"


@dataclass
class ReadinessReport:
    """Findings of one check; true when the graph is ready for the TensorRT version checked."""

    path: str
    trt_version: str
    opset: int
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return not self.findings

    @property
    def ready(self) -> bool:
        return bool(self)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "trt_version": self.trt_version, "opset": self.opset,
                "ready": self.ready, "findings": [asdict(f) for f in self.findings], "counts": self.counts}


def shipped_versions() -> list[str]:
    return sorted(p.stem for p in OPS_DIR.glob("*.json"))


def operator_support(trt_version: str) -> dict[str, Any]:
    """The supported-operator table for `trt_version` (e.g. "10.15")."""
    path = OPS_DIR / f"{trt_version}.json"
    if not path.is_file():
        raise ShipyardError(f"no ONNX operator list for TensorRT {trt_version}; "
                            f"use --trt-version {' or '.join(shipped_versions())}")
    return json.loads(path.read_text())


def _load(path: Path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file {path} not found; pass the path of an .onnx model")
    try:
        model = onnx.load(str(path))
    except Exception:  # protobuf raises several unrelated types for a damaged file
        raise ArtifactError(f"ONNX file {path} is not a readable ONNX model; re-export it") from None
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help for dtype rules, not a requirement
        return model


def check_model_file(path: Path, trt_version: str, profiles: list[ProfileSpec] | None = None) -> ReadinessReport:
    """Check one ONNX file against TensorRT `trt_version`'s parser and Q/DQ rules."""
    support = operator_support(trt_version)
    model = _load(path)
    graph = _GraphIndex(model)
    report = ReadinessReport(path=str(path), trt_version=trt_version, opset=graph.opset)
    findings = report.findings
    findings += _opset_rule(graph, support)
    findings += _operator_rule(graph, support)
    findings += _qdq_rules(graph)
    findings += _fp16_rule(graph)
    if profiles:
        findings += _dynamic_axes_rule(graph, profiles)
    report.counts = {
        "nodes": len(model.graph.node),
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
        "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
        "float16_tensors": sum(t == 10 for t in graph.dtypes.values()),
    }
    return report


class _GraphIndex:
    """Producers, consumers, constants and inferred element types of a graph, by tensor name."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.producer = {}
        self.consumers: dict[str, list] = {}
        for node in g.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.dtypes: dict[str, int] = {}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                self.dtypes[vi.name] = vi.type.tensor_type.elem_type
        for name, value in self.constants.items():
            self.dtypes.setdefault(name, _onnx_dtype(value))
        self.nodes = list(g.node)
        initializer_names = {i.name for i in g.initializer}
        self.inputs = [i for i in g.input if i.name not in initializer_names]


def _onnx_dtype(value: np.ndarray) -> int:
    from onnx import helper

    try:
        return helper.np_dtype_to_tensor_dtype(value.dtype)
    except (KeyError, ValueError, TypeError):
        return 0


def _name(node) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def _opset_rule(graph: _GraphIndex, support: dict) -> list[Finding]:
    low, high = support["opset_min"], support["opset_max"]
    if low <= graph.opset <= high:
        return []
    return [Finding("opset", "(model)", f"opset {graph.opset} is outside TensorRT {support['trt_version']}'s "
                    f"range {low}-{high}; re-export with an opset in that range")]


def _operator_rule(graph: _GraphIndex, support: dict) -> list[Finding]:
    supported = support["supported"]
    findings = []
    for node in graph.nodes:
        if node.domain not in DEFAULT_DOMAINS:
            findings.append(Finding("operator", _name(node), f"{node.domain}.{node.op_type} is a custom-domain op "
                                    "TensorRT's ONNX parser does not know (use the unfused graph, not ONNX "
                                    "Runtime's fused one)"))
        elif node.op_type not in supported:
            findings.append(Finding("operator", _name(node), f"{node.op_type} is not supported by TensorRT "
                                    f"{support['trt_version']}'s ONNX parser"))
    return findings


def _qdq_rules(graph: _GraphIndex) -> list[Finding]:
    findings: list[Finding] = []
    for node in graph.nodes:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in DEFAULT_DOMAINS:
            continue
        where = _name(node)
        scale = graph.constants.get(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            findings.append(Finding("qdq-scale", where, "scale is not a constant; TensorRT needs build-time scales"))
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            findings.append(Finding("qdq-scale", where, "scale has zero, negative or non-finite values"))
        zero_point = graph.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and zero_point is None:
            findings.append(Finding("qdq-zero-point", where, "zero point is not a constant"))
        elif zero_point is not None and np.any(zero_point != 0):
            findings.append(Finding("qdq-zero-point", where, "zero point is not 0; TensorRT takes symmetric "
                                    "quantization only (quantize with symmetric activations and weights)"))
        if node.op_type == "QuantizeLinear":
            findings += _quantize_rules(graph, node, scale, zero_point)
        else:
            findings += _dequantize_rules(graph, node, scale)
    findings += _matmul_pair_rule(graph)
    return findings


def _quantize_rules(graph: _GraphIndex, node, scale, zero_point) -> list[Finding]:
    where = _name(node)
    findings = []
    quantized_type = zero_point.dtype if zero_point is not None else None
    if quantized_type is not None and quantized_type != np.int8:
        findings.append(Finding("qdq-int8", where, f"quantizes to {quantized_type}, TensorRT takes INT8 "
                                "(UINT8 only as a network input or output)"))
    source_type = graph.dtypes.get(node.input[0])
    if source_type and source_type not in FLOAT_TYPES:
        findings.append(Finding("qdq-float-input", where, f"quantizes a non-float tensor {node.input[0]!r}; "
                                "TensorRT quantizes float32/float16/bfloat16 only"))
    if node.input[0] not in graph.constants and scale is not None and scale.size > 1:
        findings.append(Finding("qdq-activation-per-tensor", where, "activation scale is per-channel; TensorRT "
                                "quantizes activations per tensor"))
    for consumer in graph.consumers.get(node.output[0], []):
        if consumer.op_type != "DequantizeLinear":
            findings.append(Finding("qdq-pair", where, f"output feeds {consumer.op_type} {_name(consumer)!r} "
                                    "directly; every QuantizeLinear must be followed by a DequantizeLinear"))
    return findings


def _dequantize_rules(graph: _GraphIndex, node, scale) -> list[Finding]:
    where = _name(node)
    findings = []
    source = node.input[0]
    if source in graph.constants:
        weight = graph.constants[source]
        if weight.dtype != np.int8:
            findings.append(Finding("qdq-int8", where, f"dequantizes a {weight.dtype} constant; TensorRT takes "
                                    "INT8 weights (INT32 bias Q/DQ is refused: keep biases in float)"))
        elif scale is not None and scale.size > 1:
            findings += _weight_axis_rule(graph, node, weight)
    elif source not in graph.producer or graph.producer[source].op_type != "QuantizeLinear":
        producer = graph.producer.get(source)
        what = f"{producer.op_type} {_name(producer)!r}" if producer is not None else f"graph input {source!r}"
        findings.append(Finding("qdq-pair", where, f"dequantizes the output of {what}; TensorRT needs a "
                                "QuantizeLinear or an INT8 constant in front of a DequantizeLinear"))
    return findings


def _weight_axis_rule(graph: _GraphIndex, node, weight: np.ndarray) -> list[Finding]:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    axis = axis % weight.ndim
    findings = []
    for consumer in graph.consumers.get(node.output[0], []):
        if consumer.op_type not in QUANTIZED_CONSUMERS or list(consumer.input).index(node.output[0]) != 1:
            continue
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        expected = (0 if trans_b else 1) if consumer.op_type == "Gemm" else weight.ndim - 1
        if axis != expected:
            findings.append(Finding("qdq-weight-axis", _name(node), f"per-channel weight scale on axis {axis} of "
                                    f"the {consumer.op_type} {_name(consumer)!r} weight; TensorRT needs the "
                                    f"output-channel axis {expected}"))
    return findings


def _matmul_pair_rule(graph: _GraphIndex) -> list[Finding]:
    findings = []
    for node in graph.nodes:
        if node.op_type not in QUANTIZED_CONSUMERS:
            continue
        quantized = [graph.producer.get(name) is not None and graph.producer[name].op_type == "DequantizeLinear"
                     for name in node.input[:2]]
        if any(quantized) and not all(quantized):
            side = quantized.index(False)
            findings.append(Finding("qdq-matmul-both-inputs", _name(node), f"input {side} has no Q/DQ while the other "
                                    "has; TensorRT fuses INT8 GEMMs only when both inputs are quantized"))
    return findings


def _fp16_rule(graph: _GraphIndex) -> list[Finding]:
    if 10 not in graph.dtypes.values():
        return []
    findings = []
    for node in graph.nodes:
        if node.op_type in FP16_SENSITIVE and graph.dtypes.get(node.input[0]) == 10:
            findings.append(Finding("fp16-safe", _name(node), f"{node.op_type} computes in float16; keep it in "
                                    "float32 (its accumulation overflows or loses precision in float16)"))
    return findings


def _dynamic_axes_rule(graph: _GraphIndex, profiles: list[ProfileSpec]) -> list[Finding]:
    findings = []
    for graph_input in graph.inputs:
        dims = graph_input.type.tensor_type.shape.dim
        if len(dims) != 2:
            findings.append(Finding("dynamic-axes", graph_input.name, f"has rank {len(dims)}; profiles give "
                                    "[batch, sequence] ranges for rank-2 inputs"))
            continue
        for axis, label in ((0, "batch"), (1, "sequence")):
            dim = dims[axis]
            if not dim.HasField("dim_value"):
                continue
            for i, profile in enumerate(profiles):
                wanted = getattr(profile, label)
                if not wanted.min == wanted.max == dim.dim_value:
                    findings.append(Finding("dynamic-axes", graph_input.name, f"axis {axis} ({label}) is fixed at "
                                            f"{dim.dim_value} but profile {i} asks {wanted.min}-{wanted.max}; "
                                            "export with dynamic axes or fix the profile"))
    return findings
