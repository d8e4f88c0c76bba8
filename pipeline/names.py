"""The one list of names: tasks, metrics, formats, methods, kinds and engine statuses.

The recipe schema, the CLI's choices and the stages all import these, so a new task, format or
status is added here once. Each choice is written by hand as a `Literal` (what pydantic and the
type checker read) and its tuple is derived from it (what loops, messages and click read). This
module imports nothing heavy: `shipyard --help` reads it.
"""

from __future__ import annotations

from typing import Literal, get_args

# Tasks as Optimum names them; what each one is, is its entry in `pipeline.tasks`.
TaskName = Literal["text-classification", "token-classification", "question-answering", "feature-extraction"]
TASKS: tuple[str, ...] = get_args(TaskName)

MetricName = Literal["accuracy", "macro_f1", "entity_f1", "token_accuracy", "f1", "exact_match"]
METRIC_NAMES: tuple[str, ...] = get_args(MetricName)

# The INT8 formats: explicit Q/DQ ONNX for TensorRT, the ONNX Runtime CPU artifact, the OpenVINO IR.
QuantFormat = Literal["qdq", "cpu", "openvino"]
QUANT_FORMATS: tuple[str, ...] = get_args(QuantFormat)
# The candidate graph forms a CPU format is chosen among, by measurement on the building machine
# (`pipeline.stages.quantize.candidates`): ONNX Runtime's dynamic INT8 on the fused (Attention,
# SkipLayerNorm) or the unfused graph, weights per channel or per tensor (Optimum's form), the
# embedding tables in INT8 or left in float; and OpenVINO running NNCF's static INT8 of the float
# graph, or ONNX Runtime's Q/DQ graph. What each CPU form is: `stages/quantize/stage.py`, CPU_FORM_SHAPES.
CpuForm = Literal["fused-per-channel", "unfused-per-channel", "unfused-per-tensor",
                  "unfused-per-channel-float-embeddings"]
CPU_FORMS: tuple[str, ...] = get_args(CpuForm)
OpenvinoForm = Literal["nncf", "qdq"]
OPENVINO_FORMS: tuple[str, ...] = get_args(OpenvinoForm)
# Where PyTorch runs the model (model.device): auto is CUDA when torch sees a device, else the CPU.
TorchDevice = Literal["auto", "cpu", "cuda"]
# A deployment CPU's instruction set a recipe may name (the timings still come from the builder).
Isa = Literal["avx2", "avx512_vnni", "amx"]
ISAS: tuple[str, ...] = get_args(Isa)
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)

Padding = Literal["max_length", "longest"]
Sampling = Literal["random", "stratified"]
FfnScope = Literal["uniform", "global"]
FFN_SCOPES: tuple[str, ...] = get_args(FfnScope)
Sparsity24 = Literal["none", "ffn", "attention", "all"]
SPARSITY_24: tuple[str, ...] = get_args(Sparsity24)

# An artifact's precision, and its kind: the precision, or "pruned" for a float graph made by
# pruning (the gate that judges it; `pipeline.parity.policy`).
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Kind = Literal["fp32", "pruned", "fp16", "int8"]
KINDS: tuple[str, ...] = get_args(Kind)

# What became of a target's engine in a run (the manifest's targets[].engine_status).
BUILT = "built"
NEEDS_GPU_HOST = "needs a GPU host"
NOT_READY = "not built: the ONNX is not TensorRT-ready"
BUILD_FAILED = "build failed"
DEFERRED = "deferred to shipyard engines"
ENGINE_STATUSES: tuple[str, ...] = (BUILT, NEEDS_GPU_HOST, NOT_READY, BUILD_FAILED, DEFERRED)
# A build never attempted: JUnit and the report say "skipped" with the reason, never "pass".
NOT_ATTEMPTED: tuple[str, ...] = (NEEDS_GPU_HOST, NOT_READY, DEFERRED)

# The longest context a supported family has (ModernBERT's 8,192 positions): the schema's and the
# CLI's cap on tokens per row; each model's own positions are checked when it is read.
MAX_TOKENS = 8192
