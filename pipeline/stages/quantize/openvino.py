"""The OpenVINO INT8 artifact: an OpenVINO IR (`.xml` with its `.bin`), for Intel's CPU runtime.

Two candidate forms (`stages.quantize.openvino_forms`), each with the same float fallback as the
ONNX forms and then chosen by measurement (`candidates.py`):
- `nncf`: NNCF's static INT8 of the float (FP32, pruned or recovered) graph, calibrated on the
  recipe's calibration rows (transformer preset: its SmoothQuant and bias correction), the
  SmoothQuant alphas of `stages.quantize.smoothing.nncf_alphas` tried first. NNCF's ONNX
  backend is used, so the nodes the fallback keeps in float are the float graph's node names
  (NNCF's `IgnoredScope`), ranked as for the other forms; OpenVINO then converts its Q/DQ graph.
- `qdq`: ONNX Runtime's Q/DQ graph (the `qdq` format's quantizer) read by OpenVINO directly.
The IR keeps float32 weights where they are float (`compress_to_fp16=False`): the gate measured
what ships. Needs the `openvino` extra (OpenVINO and NNCF from PyPI).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.graph import model as graph_model
from pipeline.graph.proof import GraphCheckError, probe_batches
from pipeline.stages.quantize.candidates import Quantizer

Batch = dict[str, np.ndarray]


@contextlib.contextmanager
def quiet_nncf():
    """NNCF logs every node it skips and draws progress bars (on stdout, which would corrupt
    `--json`): the stage reports itself."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def to_ir(onnx_path: Path, xml: Path) -> Path:
    """Convert an ONNX graph into an IR at `xml` (its weights in the `.bin` beside it)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


def nncf_quantizer(src: Path, work: Path, batches: list[Batch], alphas: list[float]) -> Quantizer:
    """NNCF's static INT8 of `src`, one setting per SmoothQuant alpha (`alphas`, in the order the
    fallback tries them; NNCF's default for MatMuls is 0.95). The alpha only moves range between
    activations and weights, folded into the graph: measured on the demo, IRs at alphas 0.95, 0.8
    and off ran at the same speed (2.90-3.08 ms at batch 1) and agreed 0.988 / 1.0 / 1.0 with the
    float graph on its 256 tuning rows, so it is tried before any node is kept in float."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    model = onnx.load(str(src))
    names = graph_model.input_names(src)
    dataset = nncf.Dataset(batches, lambda batch: {k: v for k, v in batch.items() if k in names})

    def quantizer(alpha: float) -> Callable[[list[str]], Path]:
        def quantize(excluded: list[str]) -> Path:
            scope = nncf.IgnoredScope(names=excluded, validate=False) if excluded else None
            advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha))
            with quiet_nncf():
                quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                                          subset_size=len(batches), ignored_scope=scope, advanced_parameters=advanced)
            graph = work / f"nncf-a{alpha:g}-{len(excluded)}.onnx"
            onnx.save(quantized, str(graph))
            return to_ir(graph, graph.with_suffix(".xml"))
        return quantize

    options = {"quantizer": f"NNCF {nncf.__version__} static INT8 (ONNX backend, transformer preset)",
               "weights": "int8 symmetric per-channel", "activations": "int8 per-tensor, static scales",
               "calibration_batches": len(batches)}
    return Quantizer(src, {f"SmoothQuant alpha {alpha:g}": quantizer(alpha) for alpha in alphas}, options)


def qdq_reader(prepared: Path, quantize_qdq: Callable[[list[str]], Path], work: Path) -> Quantizer:
    """ONNX Runtime's Q/DQ graph (`quantize_qdq`) as OpenVINO reads it."""

    def quantize(excluded: list[str]) -> Path:
        graph = quantize_qdq(excluded)
        return to_ir(graph, work / f"{graph.stem}.xml")

    return Quantizer.one(prepared, quantize, {"quantizer": "ONNX Runtime Q/DQ graph, read by OpenVINO"})


# Where an IR records what the quantize stage knew (an ONNX file keeps it in its metadata_props):
# its kind, whether a pruned graph is in its ancestry, and the digests of the rows it saw.
RECORD_KEYS = ("kind", "pruned", "seen_rows")


def read_record(xml: Path) -> dict[str, str]:
    """The record `write_ir` stamped into an IR's rt_info ({} for an IR Shipyard did not write)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return {key: model.get_rt_info(["shipyard", key]).astype(str) for key in RECORD_KEYS
            if model.has_rt_info(["shipyard", key])}


def write_ir(chosen: Path, tmp: Path, out: Path, record: dict[str, str]) -> str:
    """Stamp `record` (`RECORD_KEYS`) into the chosen IR, copy it to `tmp` (the atomic temporary of
    `out`), prove OpenVINO compiles and runs it on two probe batches, and move its weights beside
    `out` last (the caller renames `tmp`). Returns what its float layers ran in here
    (`OvRunner.inference_precision`): the gates measure that, and another CPU may run another."""
    import shutil

    import openvino as ov

    from pipeline.parity.runners import OvRunner

    model = ov.Core().read_model(str(chosen))
    for key, value in record.items():
        model.set_rt_info(value, ["shipyard", key])
    stamped = chosen.with_name(f"{chosen.stem}.stamped.xml")
    ov.save_model(model, str(stamped), compress_to_fp16=False)
    shutil.copyfile(stamped, tmp)
    weights = tmp.with_suffix(".bin")
    shutil.copyfile(stamped.with_suffix(".bin"), weights)
    probes = probe_batches(graph_model.load(_onnx_beside(chosen)))
    try:
        runner = OvRunner(_as_xml(tmp), threads=1)
        precision = runner.inference_precision
        for batch in probes:
            outputs = runner.infer(batch)
            if not all(np.isfinite(v).all() for v in outputs.values()):
                raise GraphCheckError(f"quantize {out}: the OpenVINO IR gives NaN or Inf on a probe batch; not written")
    except RuntimeError as err:
        raise GraphCheckError(f"quantize {out}: OpenVINO cannot run the IR it wrote ({str(err)[:160]}); not written") \
            from None
    finally:
        link = _as_xml(tmp)
        if link != tmp:
            link.unlink(missing_ok=True)
            link.with_suffix(".bin").unlink(missing_ok=True)
    os.replace(weights, out.with_suffix(".bin"))
    return precision


def _onnx_beside(xml: Path) -> Path:
    """The ONNX graph an IR in the work folder was converted from (same stem)."""
    return xml.with_suffix(".onnx")


def _as_xml(tmp: Path) -> Path:
    """OpenVINO reads an IR only from a path ending in .xml, with its .bin of the same stem: an
    atomic temporary ends in .partial, so it is linked under such a name for the proof."""
    if tmp.suffix == ".xml":
        return tmp
    xml = tmp.with_name(tmp.name + ".xml")
    if not xml.exists():
        os.link(tmp, xml)
        os.link(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
    return xml

