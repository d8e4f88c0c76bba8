"""Static TensorRT-readiness check of an ONNX file, on CPU, before any GPU is involved.

Written here because no library does it without TensorRT itself: Polygraphy and trtexec need the
`tensorrt` package to parse. Each finding has a severity: an `error` is something TensorRT's ONNX
parser or builder refuses, or builds with a meaning other than the ONNX graph's (which the CPU
parity gate would then not have tested); a `warning` builds and runs but may cost precision or
speed. A graph is ready when it has no errors. `RULES` names each rule's severity and its source:
the ONNX-TensorRT importers (onnxOpImporters.cpp, ModelImporter.cpp), its operator support matrix
(docs/operators.md, shipped as data in `pipeline/trt/ops/<version>.json`), the ONNX operator spec,
or TensorRT's developer guide on explicit quantization. The README lists them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ArtifactError, ShipyardError
from pipeline.platforms import OPS_DIR, shipped_trt_versions
from pipeline.recipe import ProfileSpec

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16"}
INT8 = 3
QUANTIZED_CONSUMERS = ("MatMul", "Gemm")
# Ops whose float16 arithmetic loses what a BERT needs: an exponent sum, a mean over 384+ values, a square.
FP16_SENSITIVE = {"Softmax": "its exponent sum loses precision", "ReduceMean": "its sum over the hidden size "
                  "loses precision", "Pow": "squares above 256 overflow float16"}
FLOAT32_STASH = 1  # LayerNormalization's stash_type default: the parser computes the layer in float32

ERROR, WARNING = "error", "warning"
IMPORTERS = "onnx-tensorrt onnxOpImporters.cpp"
# rule -> (severity, where the rule comes from)
RULES: dict[str, tuple[str, str]] = {
    "opset": (ERROR, "onnx-tensorrt ModelImporter.cpp (opset < 7 refused) and docs/operators.md (documented range)"),
    "opset-newer": (WARNING, "docs/operators.md: the parser imports newer opsets with the documented importers"),
    "operator": (ERROR, "docs/operators.md support matrix; ModelImporter.cpp: an op with no importer must be a "
                        "registered plugin"),
    "qdq-scale": (ERROR, f"{IMPORTERS} QuantDequantLinearHelper: scales must be positive; developer guide: "
                         "INT8 scales are build-time constants"),
    "qdq-zero-point": (ERROR, f"{IMPORTERS} QuantDequantLinearHelper: zero points must be all zeros"),
    "qdq-zero-point-dynamic": (WARNING, f"{IMPORTERS} QuantDequantLinearHelper: a computed zero point is "
                                        "passed to the builder, which checks it"),
    "qdq-int8": (ERROR, f"{IMPORTERS} QuantDequantLinearHelper (UINT8 refused or built as INT8) and the ONNX "
                        "spec (no zero point means UINT8): the engine would compute something else than the "
                        "graph the CPU gate checked"),
    "qdq-float-input": (ERROR, "docs/operators.md: QuantizeLinear takes FP32/FP16/BF16"),
    "qdq-activation-per-tensor": (ERROR, "developer guide, explicit quantization: activations per tensor; "
                                         f"{IMPORTERS}: per-axis scales are taken as weight scales"),
    "qdq-pair": (ERROR, "developer guide, explicit quantization: quantized tensors reach compute layers "
                        "only through DequantizeLinear"),
    "qdq-weight-axis": (ERROR, "developer guide, explicit quantization: weights per channel on the output "
                               "channel axis"),
    "qdq-matmul-both-inputs": (WARNING, "developer guide, Q/DQ layer placement: a GEMM runs in INT8 only when "
                                        "both inputs are dequantized; otherwise it runs in float"),
    "fp16-safe": (WARNING, f"{IMPORTERS}: LayerNormalization computes in its stash_type (default float32); "
                           "Softmax and reductions compute in their input type"),
    "dynamic-axes": (ERROR, "TensorRT optimization profiles: a static input dimension must equal every "
                            "profile's min = opt = max"),
}


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    message: str

    @property
    def severity(self) -> str:
        return RULES[self.rule][0]

    @property
    def source(self) -> str:
        return RULES[self.rule][1]

    def __str__(self) -> str:
        return f"{self.severity}: {self.node}: {self.message} [{self.rule}]"

    def to_dict(self) -> dict[str, str]:
        return {**asdict(self), "severity": self.severity}


@dataclass
class ReadinessReport:
    """Findings of one check; true when the graph has no error for the TensorRT version checked."""

    path: str
    trt_version: str
    opset: int
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return not self.errors

    @property
    def ready(self) -> bool:
        return bool(self)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "trt_version": self.trt_version, "opset": self.opset, "ready": self.ready,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [f.to_dict() for f in self.findings], "counts": self.counts}


def operator_support(trt_version: str) -> dict[str, Any]:
    """The supported-operator table for `trt_version` (e.g. "10.15")."""
    path = OPS_DIR / f"{trt_version}.json"
    if not path.is_file():
        raise ShipyardError(f"no ONNX operator list for TensorRT {trt_version}; "
                            f"use --trt-version {' or '.join(shipped_trt_versions())}")
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
    if graph.opset < low:
        return [Finding("opset", "(model)", f"opset {graph.opset} is older than TensorRT {support['trt_version']}'s "
                        f"range {low}-{high}; re-export with an opset in that range")]
    if graph.opset > high:
        return [Finding("opset-newer", "(model)", f"opset {graph.opset} is newer than TensorRT "
                        f"{support['trt_version']} documents ({low}-{high}); re-export at opset {high} to be sure")]
    return []


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
            findings.append(Finding("qdq-zero-point-dynamic", where, "zero point is computed, not a constant; "
                                    "TensorRT checks at build time that it is all zeros"))
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
    has_zero_point = len(node.input) > 2 and bool(node.input[2])
    output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
    if zero_point is not None and zero_point.dtype != np.int8:
        findings.append(Finding("qdq-int8", where, f"quantizes to {zero_point.dtype}; TensorRT quantizes to INT8 "
                                "(it would build this as INT8, unlike ONNX Runtime): give an int8 zero point"))
    elif not has_zero_point and output_dtype != INT8:
        findings.append(Finding("qdq-int8", where, "has no zero point, so ONNX makes it UINT8 (negative values "
                                "clip to 0 on ONNX Runtime) while TensorRT builds it as INT8; add an int8 zero "
                                "point of 0"))
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
        if node.op_type not in (*FP16_SENSITIVE, "LayerNormalization") or graph.dtypes.get(node.input[0]) != 10:
            continue
        if node.op_type == "LayerNormalization":
            stash = next((a.i for a in node.attribute if a.name == "stash_type"), FLOAT32_STASH)
            if stash != FLOAT32_STASH:
                findings.append(Finding("fp16-safe", _name(node), f"LayerNormalization with stash_type {stash} "
                                        "computes in float16; leave stash_type at 1 (float32)"))
        elif node.op_type in FP16_SENSITIVE:
            findings.append(Finding("fp16-safe", _name(node), f"{node.op_type} computes in float16: "
                                    f"{FP16_SENSITIVE[node.op_type]}; keep it in float32 if the fp16 gate fails"))
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
