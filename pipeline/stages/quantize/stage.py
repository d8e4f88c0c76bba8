"""Post-training INT8 quantization, in two forms that serve two runtimes.

- `qdq`: explicit QuantizeLinear/DequantizeLinear pairs around MatMul/Gemm inputs on the unfused
  graph, symmetric per-channel INT8 weights (axis 1, the output channels) and symmetric
  per-tensor INT8 activations with zero points 0, scales from calibration data. This is what
  TensorRT 10/11 consumes: it has no calibrators any more, precision comes from the graph.
- `cpu`: the artifact for ONNX Runtime's CPU provider. A static Q/DQ model on an unfused graph
  ran slower than FP32 there, and ORT's quantizer refuses static quantization of the fused
  graph, so this form fuses the graph with ORT's transformer optimizer (Attention,
  SkipLayerNorm, BiasGelu) and quantizes its weights (embeddings included) per channel to INT8
  with activations scaled at run time. `bench/latency.py --cpu-candidates` measures it against
  the alternatives: on the demo model, per-tensor weights lost 2.4 points of agreement at the
  same speed, and the unfused dynamic graph was as fast and as accurate within noise.

Both forms then keep the nodes most sensitive to INT8 in float until agreement with the FP32
graph on the tuning rows (drawn from the calibration source, disjoint from the rows that set the
scales and from the evaluation rows) reaches the recipe's target (see `sensitivity.py`).
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

from calibration.readers import ort_calibration_reader
from pipeline.artifacts import Artifact, StageResult, atomic_file, external_data_files
from pipeline.errors import ShipyardError
from pipeline.graph import model as graph_model
from pipeline.graph.proof import GraphCheckError, prove_runs
from pipeline.names import QuantFormat
from pipeline.parity import policy
from pipeline.parity.policy import stamp
from pipeline.parity.runners import OrtRunner, runner_for
from pipeline.parity.tasks import Task, collect, max_abs_diff
from pipeline.parity.timing import at_length
from pipeline.recipe import QuantizeSpec
from pipeline.runtimes import RUNTIMES, ArtifactFormat, require
from pipeline.stages.quantize import candidates, openvino, sensitivity
from pipeline.stages.quantize.candidates import Form, Quantizer
from pipeline.stages.quantize.smooth import smooth_file

Batch = dict[str, np.ndarray]
QUANTIZED_OPS = ["MatMul", "Gemm"]


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ORT's quantizer logs advice through the root logger and prints calibration chatter to
    stdout, which would corrupt `--json` output; the stage reports what matters itself."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _calibration_method(spec: QuantizeSpec) -> tuple[Any, dict[str, Any]]:
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": (CalibrationMethod.MinMax, {}),
        "entropy": (CalibrationMethod.Entropy, {}),
        "percentile": (CalibrationMethod.Percentile, {"CalibPercentile": spec.percentile}),
    }
    return methods[spec.method]


def _qdq_quantizer(src: Path, work: Path, batches: list[Batch], spec: QuantizeSpec):
    """Prepare the graph once; return (prepared path, quantize(excluded) -> path, options)."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    prepared = work / "prepared.onnx"
    # Symbolic shape inference fails on Optimum's BERT export; ONNX shape inference suffices.
    large = bool(external_data_files(src))  # past protobuf's 2 GB: every tool writes external data
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True, save_as_external_data=large)
    method, method_options = _calibration_method(spec)
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        # TensorRT takes INT8 Q/DQ, not INT32 biases: leave Gemm biases in float.
        "QuantizeBias": False,
        **method_options,
    }
    cache = work / "calibration-ranges.json"  # calibrate once, reuse for every fallback try
    if spec.method == "entropy":
        _entropy_ranges(prepared, batches, cache, large)

    def quantize(excluded: list[str]) -> Path:
        out = work / f"qdq-{len(excluded)}.onnx"
        reader = ort_calibration_reader(batches, graph_model.input_names(prepared), uniform=spec.method != "minmax")
        quantize_static(
            str(prepared), str(out), reader,
            quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=method, nodes_to_exclude=excluded, extra_options=extra,
            calibration_cache_path=str(cache), use_external_data_format=large,
        )
        _float_inputs_for_excluded(out, excluded)
        graph_model.save(graph_model.load(out), out)  # in node order: ORT's quantizer may leave it unsorted
        return out

    if spec.method == "entropy":
        method_options = {"entropy_bins": ENTROPY_BINS, "entropy_quantized_bins": ENTROPY_QUANTIZED_BINS}
    options = {"method": spec.method, "ops": QUANTIZED_OPS, "weights": "int8 symmetric per-channel (axis 1)",
               "activations": "int8 symmetric per-tensor, zero point 0", **method_options}
    return prepared, quantize, options


# TensorRT's entropy calibration (the GTC 2017 method ONNX Runtime implements): a histogram of
# 2,048 bins, and the KL-optimal threshold searched from 128 bins outward.
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128


def _entropy_ranges(prepared: Path, batches: list[Batch], cache: Path, large: bool) -> None:
    """Write entropy-calibrated activation ranges into `cache`, where `quantize_static` reads them.

    `quantize_static` builds its entropy calibrator with 128 bins and 128 quantized bins and
    passes no option to change them; with as many quantized bins as bins the threshold search
    has one candidate, the whole range, so its "entropy" scales are exactly MinMax's (measured:
    every activation scale equal on the test model). ONNX Runtime's calibrator is called here
    with TensorRT's bins instead, through the cache file `quantize_static` takes."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            prepared, QUANTIZED_OPS, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy, use_external_data_format=large,
            extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS})
        calibrator.collect_data(ort_calibration_reader(batches, graph_model.input_names(prepared), uniform=True))
        with redirect_stdout(io.StringIO()):  # it prints its bin counts for every tensor
            ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache)


def _float_inputs_for_excluded(path: Path, excluded: list[str]) -> None:
    """Make the nodes kept in float read the float activation, not its Q/DQ copy.

    ORT's quantizer puts one Q/DQ pair on a tensor that quantized and excluded nodes share (the
    LayerNorm output feeding Q, K and V), and the excluded node then reads the dequantized copy:
    it loses the precision it was kept in float for, and TensorRT sees a MatMul quantized on one
    input only. Rewired here, in place; Q/DQ pairs nobody reads any more are removed."""
    if not excluded:
        return
    model = graph_model.load(path)
    names = set(excluded)
    for node in model.graph:
        if node.name not in names:
            continue
        for i, value in enumerate(node.inputs):
            dq = value.producer() if value is not None else None
            q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0] else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.replace_input_with(i, q.inputs[0])
    graph_model.drop_dead(model)
    graph_model.save(model, path)


# What each CPU form (`names.CpuForm`) is: (the graph fused, weights per channel, embedding tables in INT8).
CPU_FORM_SHAPES: dict[str, tuple[bool, bool, bool]] = {
    "fused-per-channel": (True, True, True), "unfused-per-channel": (False, True, True),
    "unfused-per-tensor": (False, False, True), "unfused-per-channel-float-embeddings": (False, True, False),
}


def _cpu_quantizer(src: Path, work: Path, smooth_with: Callable[..., dict] | None = None, fuse: bool = True,
                   per_channel: bool = True, int8_embeddings: bool = True):
    import shutil

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused = work / ("fused.onnx" if fuse else "float.onnx")
    large = bool(external_data_files(src))  # past protobuf's 2 GB: every tool writes external data
    fused_ops: dict[str, int] = {}
    if fuse:
        from onnxruntime.transformers.optimizer import optimize_model

        # num_heads/hidden_size 0: the optimizer reads them from the graph's Reshape shapes.
        optimized = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0)
        fused_ops = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(fused), use_external_data_format=large)
    elif large:
        graph_model.save(graph_model.load(src), fused, graph_model.external_data_name(fused))
    else:
        shutil.copyfile(src, fused)
    smoothing = smooth_with(fused) if smooth_with else None  # after fusion: it keeps Attention fusable
    # ORT's dynamic quantizer takes every node named `Attention` for its packed contrib op and
    # breaks the standard ONNX one (opset 23, torch's dynamo exporter): those stay in float.
    fused_model = graph_model.load(fused)
    standard_attention = [n.name or "" for n in graph_model.standard_attention_nodes(fused_model)]
    # The embedding tables: Gathers from an initializer (the fused form folds them into EmbedLayerNormalization).
    float_embeddings = [] if int8_embeddings else [n.name or "" for n in graph_model.embedding_gathers(fused_model)]
    del fused_model  # the quantizer reads the file; the weights need not stay in memory

    def quantize(excluded: list[str]) -> Path:
        out = work / f"cpu-{len(excluded)}.onnx"
        quantize_dynamic(
            str(fused), str(out), weight_type=QuantType.QInt8, per_channel=per_channel,
            nodes_to_exclude=excluded + standard_attention + float_embeddings, use_external_data_format=large,
            # The fused graph loses some value_info; without a default type the quantizer stops.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        graph_model.save(graph_model.load(out), out)  # in node order: ORT's quantizer may leave it unsorted
        return out

    options = {"fusion": "onnxruntime.transformers bert" if fuse else "none", "fused_ops": fused_ops,
               "ops": "all ONNX Runtime dynamic-quantizable ops (MatMul, Attention, EmbedLayerNormalization, Gather)",
               "weights": f"int8 symmetric per-{'channel' if per_channel else 'tensor'}",
               "embeddings": "int8" if int8_embeddings else f"float ({len(float_embeddings)} tables)",
               "activations": "int8, scaled at run time", **({"smoothing": smoothing} if smoothing else {})}
    return fused, quantize, options


def _forms(fmt: QuantFormat, spec: QuantizeSpec, src: Path, batches: list[Batch],
           smooth_with: Callable[[Path, Path | None], dict] | None) -> list[Form]:
    """The candidate forms of `fmt` the recipe names (`candidates.py`); qdq has one."""

    def qdq(work: Path) -> tuple[Path, Callable[[list[str]], Path], dict]:
        source, smoothed = src, {}
        if smooth_with:
            smoothed = {"smoothing": smooth_with(src, work / "smoothed.onnx")}
            source = work / "smoothed.onnx"
        graph, quantize, options = _qdq_quantizer(source, work, batches, spec)
        return graph, quantize, {**options, **smoothed}

    def cpu(fuse: bool, per_channel: bool, int8_embeddings: bool) -> Callable[[Path], Quantizer]:
        return lambda work: Quantizer.one(*_cpu_quantizer(src, work, smooth_with, fuse, per_channel, int8_embeddings))

    if fmt == "qdq":
        return [Form("qdq", "onnx", lambda work: Quantizer.one(*qdq(work)))]
    if fmt == "cpu":
        return [Form(name, "onnx", cpu(*CPU_FORM_SHAPES[name])) for name in spec.cpu_forms]
    makers: dict[str, Callable[[Path], Quantizer]] = {
        "nncf": lambda work: openvino.nncf_quantizer(src, work, batches, spec.smoothing.nncf_alphas),
        "qdq": lambda work: openvino.qdq_reader(*qdq(work)[:2], work)}
    return [Form(name, "openvino", makers[name]) for name in spec.openvino_forms]


def quantize_to(src: Path, out: Path, fmt: QuantFormat, spec: QuantizeSpec, batches: list[Batch],
                tuning: list[Batch], task: Task, seen_rows: Sequence[str] = ()) -> dict[str, Any]:
    """Quantize `src` into `out` (atomically) in format `fmt`, scales from `batches`: each of its
    candidate forms takes the float fallback chosen on `tuning`, and the fastest that meets its
    agreement target ships (`candidates.py`); returns the options, fallback trials and choice."""
    if spec.fallback.max_nodes and not tuning:
        raise ShipyardError("the INT8 float fallback chooses on tuning rows; set data.tuning_samples (or "
                            "--tuning-samples) above 0, or stages.quantize.fallback.max_nodes to 0")
    if fmt == "openvino":
        require("openvino", "stages.quantize.formats: openvino")
    with atomic_file(out) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent) as work_dir, _quiet_quantizer():
        work = Path(work_dir)

        def smooth_with(path: Path, into: Path | None = None) -> dict:  # by default in place: the stage's own copy
            return smooth_file(path, into or path, batches, spec.smoothing.alpha).to_dict()

        tried, failed = [], []
        for number, form in enumerate(_forms(fmt, spec, src, batches,
                                             smooth_with if fmt in spec.smoothing.formats else None)):
            folder = work / f"form-{number}"
            folder.mkdir()
            made = form.make(folder)
            try:
                chosen, excluded, trials, trial = _fallback(made, spec, batches, tuning, task)
            except RuntimeError as err:  # its runtime cannot compile or run what the form made
                first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
                failed.append({"form": form.name, "runtime": form.runtime, "failed": first})
                continue
            tried.append(candidates.Tried(form, chosen, excluded, trials, trial, made.options))
        if not tried:
            raise GraphCheckError(f"quantize {out}: no {fmt} form runs here: " + "; ".join(
                f"{f['form']}: {f['failed']}" for f in failed) + "; not written")
        longest = max(b["input_ids"].shape[1] for b in batches)  # timed at the longest calibration row
        winner, choice = candidates.choose(tried, src, spec.fallback.min_agreement, at_length(batches[0], longest),
                                           spec.deploy_isa, failed)
        runtime_notes: dict[str, str] = {}
        if winner.form.runtime == "openvino":
            source = graph_model.load(src)
            seen = sorted(set(policy.seen_rows(source)) | set(seen_rows))
            precision = openvino.write_ir(winner.path, tmp, out, {
                "kind": "int8", "seen_rows": ",".join(seen), "pruned": str(policy.PRUNED_MARK in source.metadata_props)})
            runtime_notes["float_layers_ran_in"] = (
                f"{precision} (OpenVINO's choice on this CPU, which the gates measured: bf16 where the CPU has "
                "avx512_bf16 or AMX, f32 elsewhere)")
        else:
            model = graph_model.load(winner.path)
            stamp(model, "int8", seen_rows)
            graph_model.save(model, tmp, graph_model.external_data_name(out))
            prove_runs(tmp, f"quantize {out}")
    return {
        "format": fmt, **({"form": winner.form.name} if fmt != "qdq" else {}), **winner.options,
        "calibration_rows": int(sum(len(b["input_ids"]) for b in batches)), "float_nodes": winner.excluded,
        "fallback": {"target_agreement": spec.fallback.min_agreement, "on": "tuning rows vs FP32 graph",
                     "tuning_rows": int(sum(len(b["input_ids"]) for b in tuning)),
                     **({"setting": winner.chosen.setting} if winner.chosen.setting else {}),
                     "trials": [t.record() for t in winner.trials]},
        **({"choice": choice} if fmt != "qdq" else {}), **runtime_notes,
    }


def _fallback(made: Quantizer, spec: QuantizeSpec, batches: list[Batch], tuning: list[Batch], task: Task
              ) -> tuple[Path, list[str], list[sensitivity.Trial], sensitivity.Trial]:
    """The setting and the fewest nodes of `made.graph` to keep in float for agreement with it on
    `tuning` to reach the target (`sensitivity.settle`, then `sensitivity.search`); the artifact a
    quantizer makes runs on its own runtime. Returns (artifact, float nodes, every trial, the chosen)."""
    reference = collect(OrtRunner(made.graph), tuning, task) if tuning else []

    def evaluate(path: Path) -> tuple[float, float]:
        if not tuning:
            return float("nan"), float("nan")
        got = collect(runner_for(path), tuning, task)
        largest, _ = max_abs_diff(reference, got, tuning, task.per_token)
        return task.agreement_rate(reference, got, tuning), largest

    settled: list[sensitivity.Trial] = []
    measured = None
    name = next(iter(made.settings))
    if len(made.settings) > 1 and tuning:  # a setting costs no speed: each is tried before a node is kept in float
        name, path, settled = sensitivity.settle(made.settings, evaluate, spec.fallback.min_agreement)
        measured = (path, next(t for t in settled if t.setting == name))
    ranking = sensitivity.rank_nodes(made.graph, batches) if spec.fallback.max_nodes else []
    path, excluded, trials, chosen = sensitivity.search(made.settings[name], evaluate, ranking,
                                                        spec.fallback.min_agreement, spec.fallback.max_nodes, measured)
    return path, excluded, [t for t in settled if t.setting != name] + trials, chosen


def run(src: Artifact, spec: QuantizeSpec, fmt: QuantFormat, out_path: Path, calibration_batches: list[Batch],
        tuning_batches: list[Batch], task: Task, seen_rows: Sequence[str] = ()) -> StageResult:
    """Quantize the FP32 artifact `src` into `out_path` in form `fmt`; `src` is not modified. The
    float fallback measures `task`'s agreement on the tuning rows."""
    started = time.perf_counter()
    options = quantize_to(src.path, out_path, fmt, spec, calibration_batches, tuning_batches, task, seen_rows)
    artifact = Artifact(
        name=f"model.int8.{fmt}", path=out_path, format=runtime_of(fmt), precision="int8", from_pruned=src.from_pruned,
        stage="quantize", options={"source_sha256": src.sha256, **options},
    )
    setting = options["fallback"].get("setting")
    chosen = next(t for t in options["fallback"]["trials"]
                  if t["excluded"] == len(options["float_nodes"]) and t.get("setting") == setting)
    form = f"{options['form']} ({len(options['choice']['candidates'])} candidates); " if "form" in options else ""
    where = options.get("choice", {}).get("timings_from", "")
    form += f"candidates {where.split(', ', 1)[1]}; " if ", which lacks" in where else ""
    return StageResult(
        stage=f"quantize[{fmt}]", artifacts=[artifact], seconds=time.perf_counter() - started,
        message=(f"{form}{artifact.size_bytes / 1e6:.1f} MB from {src.size_bytes / 1e6:.1f} MB; "
                 f"{setting + ', ' if setting else ''}{chosen['excluded']} nodes kept in float, "
                 f"tuning-row agreement {chosen['agreement']:.4f}"),
    )


def runtime_of(fmt: QuantFormat) -> ArtifactFormat:
    """The runtime an INT8 format's artifact is for."""
    return "openvino" if fmt == "openvino" else "onnx"


def file_name(fmt: QuantFormat) -> str:
    """The file an INT8 format's artifact is written to (its runtime's suffix)."""
    return f"model.int8.{fmt}{RUNTIMES[runtime_of(fmt)].suffixes[0]}"
