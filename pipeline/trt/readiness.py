"""Static TensorRT-readiness check of an ONNX file, on CPU, before any GPU is involved.

Written here because no library does it without TensorRT itself: Polygraphy and trtexec need the
`tensorrt` package to parse. Each finding has a severity: an `error` is something TensorRT's ONNX
parser or builder refuses, or builds with a meaning other than the ONNX graph's (which the CPU
parity gate would then not have tested); a `warning` builds and runs but may cost precision or
speed. A graph is ready when it has no errors. `RULES` names each rule's severity and its source:
the ONNX-TensorRT importers (onnxOpImporters.cpp, ModelImporter.cpp), its operator support matrix
(docs/operators.md, shipped as data in `pipeline/trt/ops/<version>.json`), the ONNX operator spec,
or TensorRT's developer guide on explicit quantization. docs/tensorrt.md lists them (generated from `RULES`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from pipeline.errors import ArtifactError, ShipyardError
from pipeline.graph import model as graph_model
from pipeline.graph.model import constant
from pipeline.platforms import OPS_DIR, TRT_RELEASES, shipped_trt_versions
from pipeline.recipe import ProfileSpec

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16"}
INT8 = 3
QUANTIZED_CONSUMERS = ("MatMul", "Gemm")
# Ops whose float16 arithmetic loses what a BERT needs: an exponent sum, a mean over 384+ values, a square.
FP16_SENSITIVE = {"Softmax": "its exponent sum loses precision", "ReduceMean": "its sum over the hidden size "
                  "loses precision", "Pow": "squares above 256 overflow float16",
                  "Sin": "a rotary angle above 2,048 radians keeps no fraction in float16",
                  "Cos": "a rotary angle above 2,048 radians keeps no fraction in float16"}
FLOAT32_STASH = 1  # LayerNormalization's stash_type default: the parser computes the layer in float32

ERROR, WARNING = "error", "warning"
IMPORTERS = "onnx-tensorrt onnxOpImporters.cpp"
# rule -> (severity, where the rule comes from)
RULES: dict[str, tuple[str, str]] = {
    "opset": (ERROR, "onnx-tensorrt ModelImporter.cpp (opset < 7 refused) and docs/operators.md (documented range)"),
    "opset-newer": (ERROR, "docs/operators.md: the version's documented opset range; a newer opset's operator "
                    "versions have no importer of that version"),
    "strongly-typed": (ERROR, "TensorRT 11.0 release notes: strong typing is the only mode; no precision builder "
                       "flags, no INT8 calibrator: FP16 and INT8 must be in the graph"),
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
    "op-restriction": (ERROR, "docs/operators.md restrictions: Attention takes 4-D Q, K, V and attn_mask and no "
                              "past_key, past_value or nonpad_kv_seqlen; RotaryEmbedding's position_ids are INT64"),
    "types-unknown": (WARNING, "shape inference (onnx) gave some values no element type: the Q/DQ and FP16 "
                      "rules, which read types, skipped them"),
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


def _load(path: Path) -> ir.Model:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file {path} not found; pass the path of an .onnx model")
    from google.protobuf.message import DecodeError

    try:
        model = graph_model.load(path)
    except (DecodeError, ValueError):  # a truncated or damaged protobuf
        raise ArtifactError(f"ONNX file {path} is not a readable ONNX model; re-export it") from None
    # The pass logs and leaves the model unchanged when inference fails: `_types_rule` reports
    # the values left without a type, rather than the rules skipping them silently.
    return ShapeInferencePass(check_type=False, strict_mode=False)(model).model


def check_model_file(path: Path, trt_version: str, profiles: list[ProfileSpec] | None = None,
                     precision: str | None = None) -> ReadinessReport:
    """Check one ONNX file against TensorRT `trt_version`'s parser and Q/DQ rules (and, for a
    target of `precision` on a strongly typed TensorRT, that the graph carries that precision)."""
    support = operator_support(trt_version)
    graph = _Graph(_load(path))
    report = ReadinessReport(path=str(path), trt_version=trt_version, opset=graph.opset)
    findings = report.findings
    findings += _opset_rule(graph, support)
    findings += _operator_rule(graph, support)
    findings += _qdq_rules(graph)
    findings += _fp16_rule(graph)
    findings += _restriction_rule(graph, support)
    findings += _types_rule(graph)
    if profiles:
        findings += _dynamic_axes_rule(graph, profiles)
    if precision and trt_version in TRT_RELEASES and TRT_RELEASES[trt_version].strongly_typed_only:
        findings += _strongly_typed_rule(graph, precision, trt_version)
    report.counts = {
        "nodes": len(graph.nodes),
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in graph.nodes),
        "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in graph.nodes),
        "float16_tensors": sum(v.dtype == ir.DataType.FLOAT16 for v in graph.values),
    }
    return report


def _strongly_typed_rule(graph: _Graph, precision: str, trt_version: str) -> list[Finding]:
    """TensorRT 11 builds every layer in its graph's types: an fp16 target without float16
    tensors or an int8 one without Q/DQ would build silently in FP32."""
    if precision == "fp16" and not any(v.dtype == ir.DataType.FLOAT16 for v in graph.values):
        return [Finding("strongly-typed", "(model)", f"an fp16 target on TensorRT {trt_version} needs float16 in the "
                        "graph (no FP16 builder flag since 11.0); use the target's model.trt.fp16.onnx")]
    if precision == "int8" and not any(n.op_type == "QuantizeLinear" for n in graph.nodes):
        return [Finding("strongly-typed", "(model)", f"an int8 target on TensorRT {trt_version} needs explicit Q/DQ "
                        "(no INT8 calibrator since 11.0); use the target's model.trt.int8-*.onnx")]
    return []


def _types_rule(graph: _Graph) -> list[Finding]:
    untyped = [v for v in graph.values if v.dtype is None]
    if not untyped:
        return []
    producer = untyped[0].producer()
    return [Finding("types-unknown", (producer.name or "") if producer is not None else "",
                    f"{len(untyped)} value(s) have no element type after shape inference (first: {untyped[0].name}); "
                    "the dtype rules skipped them: run onnx shape inference on the graph, or re-export it")]


@dataclass
class _Graph:
    """The checked graph (`pipeline.graph.model`) and what every rule reads: opset, nodes, values."""

    model: ir.Model
    opset: int = 0
    nodes: list[ir.Node] = field(default_factory=list)
    values: list[ir.Value] = field(default_factory=list)  # inputs, initializers, node outputs

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.opset = next((v for d, v in graph.opset_imports.items() if d in DEFAULT_DOMAINS), 0)
        self.nodes = list(graph)
        self.values = [*graph.inputs, *(v for v in graph.initializers.values() if not v.is_graph_input()),
                       *(v for n in self.nodes for v in n.outputs)]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _int(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else int(attribute.value)


def _op(value: ir.Value | None) -> str | None:
    producer = value.producer() if value is not None else None
    return producer.op_type if producer is not None else None


def _name(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({node.outputs[0].name})"


def _opset_rule(graph: _Graph, support: dict) -> list[Finding]:
    low, high = support["opset_min"], support["opset_max"]
    if graph.opset < low:
        return [Finding("opset", "(model)", f"opset {graph.opset} is older than TensorRT {support['trt_version']}'s "
                        f"range {low}-{high}; re-export with an opset in that range")]
    if graph.opset > high:
        return [Finding("opset-newer", "(model)", f"opset {graph.opset} is newer than TensorRT "
                        f"{support['trt_version']} documents ({low}-{high}); re-export at opset {high} to be sure")]
    return []


def _operator_rule(graph: _Graph, support: dict) -> list[Finding]:
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


def _qdq_rules(graph: _Graph) -> list[Finding]:
    findings: list[Finding] = []
    for node in graph.nodes:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in DEFAULT_DOMAINS:
            continue
        where = _name(node)
        scale = constant(_input(node, 1))
        if scale is None:
            findings.append(Finding("qdq-scale", where, "scale is not a constant; TensorRT needs build-time scales"))
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            findings.append(Finding("qdq-scale", where, "scale has zero, negative or non-finite values"))
        zero_point = constant(_input(node, 2))
        if _input(node, 2) is not None and zero_point is None:
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


def _quantize_rules(graph: _Graph, node, scale, zero_point) -> list[Finding]:
    where = _name(node)
    findings = []
    has_zero_point = _input(node, 2) is not None
    output_dtype = _int(node, "output_dtype", 0)
    if zero_point is not None and zero_point.dtype != np.int8:
        findings.append(Finding("qdq-int8", where, f"quantizes to {zero_point.dtype}; TensorRT quantizes to INT8 "
                                "(it would build this as INT8, unlike ONNX Runtime): give an int8 zero point"))
    elif not has_zero_point and output_dtype != INT8:
        findings.append(Finding("qdq-int8", where, "has no zero point, so ONNX makes it UINT8 (negative values "
                                "clip to 0 on ONNX Runtime) while TensorRT builds it as INT8; add an int8 zero "
                                "point of 0"))
    source = node.inputs[0]
    source_type = source.dtype if source is not None else None
    if source_type and source_type not in FLOAT_TYPES:
        findings.append(Finding("qdq-float-input", where, f"quantizes a non-float tensor {source.name!r}; "
                                "TensorRT quantizes float32/float16/bfloat16 only"))
    if constant(source) is None and scale is not None and scale.size > 1:
        findings.append(Finding("qdq-activation-per-tensor", where, "activation scale is per-channel; TensorRT "
                                "quantizes activations per tensor"))
    for consumer in node.outputs[0].consumers():
        if consumer.op_type != "DequantizeLinear":
            findings.append(Finding("qdq-pair", where, f"output feeds {consumer.op_type} {_name(consumer)!r} "
                                    "directly; every QuantizeLinear must be followed by a DequantizeLinear"))
    return findings


def _dequantize_rules(graph: _Graph, node, scale) -> list[Finding]:
    where = _name(node)
    findings = []
    source = node.inputs[0]
    weight = constant(source)
    if weight is not None:
        if weight.dtype != np.int8:
            findings.append(Finding("qdq-int8", where, f"dequantizes a {weight.dtype} constant; TensorRT takes "
                                    "INT8 weights (INT32 bias Q/DQ is refused: keep biases in float)"))
        elif scale is not None and scale.size > 1:
            findings += _weight_axis_rule(graph, node, weight)
    elif _op(source) != "QuantizeLinear":
        producer = source.producer() if source is not None else None
        what = f"{producer.op_type} {_name(producer)!r}" if producer is not None else \
            f"graph input {source.name if source is not None else ''!r}"
        findings.append(Finding("qdq-pair", where, f"dequantizes the output of {what}; TensorRT needs a "
                                "QuantizeLinear or an INT8 constant in front of a DequantizeLinear"))
    return findings


def _weight_axis_rule(graph: _Graph, node, weight: np.ndarray) -> list[Finding]:
    axis = _int(node, "axis", 1) % weight.ndim
    findings = []
    for consumer in node.outputs[0].consumers():
        if consumer.op_type not in QUANTIZED_CONSUMERS or _input(consumer, 1) is not node.outputs[0]:
            continue
        trans_b = _int(consumer, "transB", 0)
        expected = (0 if trans_b else 1) if consumer.op_type == "Gemm" else weight.ndim - 1
        if axis != expected:
            findings.append(Finding("qdq-weight-axis", _name(node), f"per-channel weight scale on axis {axis} of "
                                    f"the {consumer.op_type} {_name(consumer)!r} weight; TensorRT needs the "
                                    f"output-channel axis {expected}"))
    return findings


def _matmul_pair_rule(graph: _Graph) -> list[Finding]:
    findings = []
    for node in graph.nodes:
        if node.op_type not in QUANTIZED_CONSUMERS:
            continue
        quantized = [_op(value) == "DequantizeLinear" for value in node.inputs[:2]]
        if any(quantized) and not all(quantized):
            side = quantized.index(False)
            findings.append(Finding("qdq-matmul-both-inputs", _name(node), f"input {side} has no Q/DQ while the other "
                                    "has; TensorRT fuses INT8 GEMMs only when both inputs are quantized"))
    return findings


def _fp16_rule(graph: _Graph) -> list[Finding]:
    if not any(v.dtype == ir.DataType.FLOAT16 for v in graph.values):
        return []
    findings = []
    for node in graph.nodes:
        source = node.inputs[0] if node.inputs else None
        if (node.op_type not in (*FP16_SENSITIVE, "LayerNormalization") or source is None
                or source.dtype != ir.DataType.FLOAT16):
            continue
        if node.op_type == "LayerNormalization":
            stash = _int(node, "stash_type", FLOAT32_STASH)
            if stash != FLOAT32_STASH:
                findings.append(Finding("fp16-safe", _name(node), f"LayerNormalization with stash_type {stash} "
                                        "computes in float16; leave stash_type at 1 (float32)"))
        elif node.op_type in FP16_SENSITIVE:
            findings.append(Finding("fp16-safe", _name(node), f"{node.op_type} computes in float16: "
                                    f"{FP16_SENSITIVE[node.op_type]}; keep it in float32 if the fp16 gate fails"))
    return findings


def _restriction_rule(graph: _Graph, support: dict) -> list[Finding]:
    """The documented restrictions of the ops modern encoders bring (opset 23's Attention and
    RotaryEmbedding), where the parser has them; what shape inference leaves unknown is not judged."""
    findings = []
    for node in graph.nodes:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in support["supported"]:
            continue
        if node.op_type == "Attention":
            extra = [i for i, v in enumerate(node.inputs) if i >= 4 and v is not None]
            if extra:
                findings.append(Finding("op-restriction", _name(node), f"Attention has inputs {extra} (past_key, "
                                        "past_value, nonpad_kv_seqlen), which TensorRT does not take; export "
                                        "without a key/value cache"))
            ranks = {i: len(v.shape) for i, v in enumerate(node.inputs[:4]) if v is not None and v.shape is not None}
            if any(rank != 4 for rank in ranks.values()):
                findings.append(Finding("op-restriction", _name(node), f"Attention input ranks {ranks}: TensorRT takes "
                                        "4-D Q, K, V and attn_mask; export with the heads split ([B, H, S, d])"))
        elif node.op_type == "RotaryEmbedding":
            positions = _input(node, 3)
            if positions is not None and positions.dtype not in (None, ir.DataType.INT64):
                findings.append(Finding("op-restriction", _name(node), f"RotaryEmbedding's position_ids are "
                                        f"{positions.dtype}; TensorRT takes INT64: cast them"))
    return findings


def _dynamic_axes_rule(graph: _Graph, profiles: list[ProfileSpec]) -> list[Finding]:
    findings = []
    for graph_input in graph.model.graph.inputs:
        if graph_input.is_initializer():
            continue
        dims = list(graph_input.shape or ())
        if len(dims) != 2:
            findings.append(Finding("dynamic-axes", graph_input.name or "", f"has rank {len(dims)}; profiles give "
                                    "[batch, sequence] ranges for rank-2 inputs"))
            continue
        for axis, label in ((0, "batch"), (1, "sequence")):
            dim = dims[axis]
            if not isinstance(dim, int):
                continue
            for i, profile in enumerate(profiles):
                wanted = getattr(profile, label)
                if not wanted.min == wanted.max == dim:
                    findings.append(Finding("dynamic-axes", graph_input.name or "", f"axis {axis} ({label}) is fixed at "
                                            f"{dim} but profile {i} asks {wanted.min}-{wanted.max}; "
                                            "export with dynamic axes or fix the profile"))
    return findings
