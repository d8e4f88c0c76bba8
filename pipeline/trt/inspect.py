"""Whether a built engine runs in the precision its target asked for, from TensorRT's inspector.

TensorRT 11 can build an FP32 engine where FP16 was asked without a word (NVIDIA/TensorRT#4590,
roboflow/rf-detr#1453), so after every build the engine inspector's per-layer JSON (the engine
built with `ProfilingVerbosity.DETAILED`; `IEngineInspector.get_engine_information(JSON)`) is
read: each layer's precision is the narrowest float type among its outputs' "Format/Datatype"
("Row major linear FP16 format", "Int8", ...), reformat layers and layers with only integer or
bool outputs (shape arithmetic) left out. A target that asked for fp16 or int8 and got more than
`MAX_FP32_SHARE` of its float layers in FP32 fails its build stage, naming the share: a BERT
engine built as asked keeps only LayerNorm, Softmax and a few casts in float32 (`trt_onnx.py`).
Pure functions of the JSON, so they are tested on CPU with inspector output in that format.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_FP32_SHARE = 0.5
# Narrowest first: a layer counts as the narrowest float type it writes.
_TYPES = (("fp4", ("fp4",)), ("fp8", ("fp8", "e4m3")), ("int8", ("int8",)), ("bf16", ("bf16", "bfloat16")),
          ("fp16", ("fp16", "half")), ("fp32", ("fp32", "float")))
# What each asked precision accepts as "built as asked".
REDUCED = {"fp16": {"fp16", "bf16"}, "int8": {"int8", "fp8", "fp4", "fp16", "bf16"}, "fp32": {"fp32"}}


def datatype(text: str) -> str | None:
    """The float type named in an inspector "Format/Datatype" string; None for integer and bool."""
    lowered = text.lower()
    if any(word in lowered for word in ("int32", "int64", "bool", "uint8")):
        return None
    return next((name for name, words in _TYPES if any(w in lowered for w in words)), None)


@dataclass
class PrecisionCheck:
    """What the engine's float layers run in, and whether that is what the target asked."""

    asked: str
    layers: dict[str, int] = field(default_factory=dict)  # precision -> layers
    fp32_share: float = 0.0
    passed: bool = True
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"asked": self.asked, "layers": self.layers, "fp32_share": round(self.fp32_share, 4),
                "passed": self.passed, "message": self.message}


def layer_precisions(info: dict[str, Any]) -> Counter:
    """Float layers per precision in an engine inspector's JSON (module docstring)."""
    layers = info.get("Layers")
    if not isinstance(layers, list) or any(not isinstance(layer, dict) for layer in layers):
        raise ValueError("the inspector JSON has no per-layer detail: build the engine with "
                         "ProfilingVerbosity.DETAILED")
    counts: Counter = Counter()
    for layer in layers:
        if str(layer.get("LayerType", "")).lower() == "reformat":
            continue
        types = [datatype(str(o.get("Format/Datatype", ""))) for o in layer.get("Outputs", [])]
        floats = [t for t in types if t is not None]
        if floats:
            counts[min(floats, key=lambda t: [name for name, _ in _TYPES].index(t))] += 1
    return counts


def precision_check(info: dict[str, Any], asked: str) -> PrecisionCheck:
    """Whether the engine runs in `asked` (fp32, fp16 or int8) by its inspector JSON."""
    counts = layer_precisions(info)
    total = sum(counts.values())
    check = PrecisionCheck(asked, dict(sorted(counts.items())))
    if not total:
        check.message = "the inspector lists no float layer"
        return check
    check.fp32_share = counts["fp32"] / total
    if asked == "fp32":
        reduced = total - counts["fp32"]
        check.passed = reduced == 0
        check.message = (f"all {total} float layers in FP32" if check.passed else
                         f"asked fp32; {reduced} of {total} float layers run in reduced precision")
        return check
    check.passed = check.fp32_share <= MAX_FP32_SHARE and any(counts[t] for t in REDUCED[asked])
    built = ", ".join(f"{n} {t.upper()}" for t, n in sorted(counts.items()))
    check.message = (f"asked {asked}: {counts['fp32']} of {total} float layers ({check.fp32_share:.0%}) run in FP32 "
                     f"({built})" + ("" if check.passed else f"; more than {MAX_FP32_SHARE:.0%}: TensorRT built "
                                     "another precision than asked; not shipped"))
    return check
