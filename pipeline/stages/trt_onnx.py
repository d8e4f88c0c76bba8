"""Strongly typed ONNX for TensorRT targets: the graph says each tensor's precision.

TensorRT 10's strongly typed networks (and TensorRT 11, which removed weak typing and the
FP16/INT8 builder flags) take precision from the ONNX types, so each target gets the graph it
needs, made once per distinct precision and shared by targets that need the same one:

- `fp32`: the dense FP32 artifact itself (`model.onnx`, or `model.pruned.onnx`);
- `int8` with `non_quantized: fp32`: the Q/DQ artifact itself;
- `fp16`: the dense artifact converted with ONNX Runtime's float16 converter;
- `int8` with `non_quantized: fp16` (the default): the Q/DQ artifact converted the same way, after
  moving it to opset 19, the first opset whose Q/DQ take float16 scales.

The conversion keeps LayerNormalization and Softmax (and a decomposed LayerNorm's reductions) in
float32: their accumulations overflow or lose precision in float16. It keeps the nodes
`pipeline.graph.precision` finds in float32 too: index arithmetic (DeBERTa's and MPNet's log
buckets), rotary angles (ModernBERT's), and, where the family's entry says so (DeBERTa), the
attention scores. Graph inputs are token ids (int64) and stay so; the logits output stays float32
unless the target asks for float16.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import Artifact, StageResult, atomic_file
from pipeline.graph import model as graph_model
from pipeline.graph.precision import float32_nodes
from pipeline.graph.proof import prove_runs
from pipeline.names import Precision
from pipeline.parity.policy import kind_of, stamp
from pipeline.recipe import TargetSpec

FLOAT32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"]
QDQ_FLOAT16_OPSET = 19


@dataclass(frozen=True)
class TypedVariant:
    """What a target needs from the graph; targets with equal variants share one file."""

    precision: str
    non_quantized: str
    output_dtype: str

    @classmethod
    def of(cls, target: TargetSpec) -> TypedVariant:
        non_quantized = target.non_quantized if target.precision == "int8" else target.precision
        output = "fp32" if target.precision == "fp32" else target.output_dtype
        return cls(target.precision, non_quantized, output)

    @property
    def converts(self) -> bool:
        return self.non_quantized == "fp16"

    @property
    def name(self) -> str:
        parts = [f"model.trt.{self.precision}"]
        if self.precision == "int8":
            parts.append(f"-{self.non_quantized}")
        if self.output_dtype == "fp16":
            parts.append("-out16")
        return "".join(parts)


def to_float16(src: Path, out: Path, output_fp16: bool, kind: str, float32_scores: bool) -> dict:
    """Write `src` with float tensors in float16 (sensitive ops and nodes kept float32) to `out`,
    atomically; `float32_scores`: keep the attention scores in float32 too (the family's entry)."""
    import onnx
    from onnx import version_converter
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    if has_qdq and opset < QDQ_FLOAT16_OPSET:
        model = version_converter.convert_version(model, QDQ_FLOAT16_OPSET)
    kept = float32_nodes(graph_model.from_proto(model), float32_scores)
    wrapped = OnnxModel(model)
    wrapped.convert_float_to_float16(
        use_symbolic_shape_infer=False, keep_io_types=not output_fp16, op_block_list=FLOAT32_OPS,
        **({"node_block_list": kept} if kept else {}),
    )
    _no_float16_round_trips(wrapped.model)
    wrapped.topological_sort()  # the converter appends its Cast nodes at the end of the graph
    typed = graph_model.from_proto(wrapped.model)
    stamp(typed, kind)
    with atomic_file(out) as tmp:
        graph_model.save(typed, tmp, graph_model.external_data_name(out))
        prove_runs(tmp, f"typed ONNX {out}")
    return {
        "conversion": "onnxruntime.transformers float16", "float32_ops": FLOAT32_OPS, "float32_nodes": len(kept),
        "opset": max(opset, QDQ_FLOAT16_OPSET) if has_qdq else opset, "output_dtype": "fp16" if output_fp16 else "fp32",
        "cast_nodes": sum(n.op_type == "Cast" for n in wrapped.model.graph.node),
    }


def _no_float16_round_trips(model) -> None:
    """The converter treats each float32 node as an island: its float output is cast to float16
    and cast back up by the next float32 node, so a chain kept in float32 (positions into rotary
    angles) still passes through float16 between its nodes, and its cascade cleanup can even turn
    int64 -> float32 -> float16 into int64 -> float16. A cast up to float32 reads what the cast
    down to float16 read instead: a float32 node never sees a value float16 has rounded."""
    from onnx import TensorProto

    producers = {out: node for node in model.graph.node for out in node.output}

    def casts_to(node, to: int) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)

    for node in model.graph.node:
        parent = producers.get(node.input[0]) if casts_to(node, TensorProto.FLOAT) else None
        if parent is not None and casts_to(parent, TensorProto.FLOAT16):
            node.input[0] = parent.input[0]
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Cast" and not set(n.output) & used]
    for node in dead:
        model.graph.node.remove(node)


def run(variant: TypedVariant, source: Artifact, out_dir: Path, targets: list[str], float32_scores: bool) -> StageResult:
    """Make the typed graph for `variant` from `source` (the dense or Q/DQ artifact); the model's
    family says whether its attention scores stay float32 (`pipeline.families`)."""
    started = time.perf_counter()
    out = Path(out_dir) / f"{variant.name}.onnx"
    precision: Precision = "int8" if variant.precision == "int8" else "fp16"
    options = to_float16(source.path, out, variant.output_dtype == "fp16", kind_of(precision, source.from_pruned),
                         float32_scores)
    artifact = Artifact(
        name=variant.name, path=out, format="onnx", precision=precision, stage="trt-onnx",
        from_pruned=source.from_pruned,
        options={"source": source.name, "source_sha256": source.sha256, "targets": targets,
                 "non_quantized": variant.non_quantized, **options},
    )
    return StageResult(
        stage=f"trt-onnx[{variant.name}]", artifacts=[artifact], seconds=time.perf_counter() - started,
        message=f"{variant.name}.onnx from {source.name}: {artifact.size_bytes / 1e6:.1f} MB, "
                f"{options['cast_nodes']} casts, float32 kept for {', '.join(FLOAT32_OPS[:2])}",
    )
