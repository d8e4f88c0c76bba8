"""Export a Hugging Face model to ONNX with Optimum, gated on logits matching PyTorch."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from pipeline.artifacts import Artifact, StageResult, atomic_file, external_data_files
from pipeline.graph import model as graph_model
from pipeline.parity.runners import OrtRunner, TorchRunner
from pipeline.parity.tasks import Task, collect, max_abs_diff
from pipeline.recipe import ExportSpec

Batch = dict[str, np.ndarray]


def export_onnx(model_dir: Path, out_path: Path, opset: int, task: str) -> None:
    """Optimum export of `model_dir` to `out_path` (written atomically; a model over 2 GB keeps its
    weights in `<name>_data` beside it)."""
    with atomic_file(out_path) as tmp_file:
        _export_into(model_dir, tmp_file, opset, task, out_path)


def _export_into(model_dir: Path, tmp_file: Path, opset: int, task: str, out_path: Path) -> None:
    import transformers
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory(dir=tmp_file.parent) as work:
        logging.getLogger("optimum").setLevel(logging.ERROR)
        transformers.logging.set_verbosity_error()  # Optimum's own deprecation notices are not ours
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(
                str(model_dir),
                output=work,
                task=task,
                opset=opset,
                device="cpu",
                do_validation=False,  # our own gate below runs on real rows, and fails hard
                local_files_only=True,
                trust_remote_code=False,  # never run code shipped in a model folder
            )
        exported = Path(work) / "model.onnx"
        if external_data_files(exported):  # Optimum's model.onnx_data: renamed after the artifact
            graph_model.save(graph_model.load(exported), tmp_file, graph_model.external_data_name(out_path))
        else:
            shutil.move(str(exported), tmp_file)


def run(
    model_dir: Path,
    out_path: Path,
    spec: ExportSpec,
    validation_batches: list[Batch],
    reference: TorchRunner,
    task: Task,
) -> StageResult:
    """Export for `task`, then compare its outputs with PyTorch on `validation_batches` (non-padding
    positions; embeddings after pooling); fail beyond `spec.atol`."""
    started = time.perf_counter()
    # The file is renamed into place only once the gate has run (pass or fail): a crash on the
    # way leaves no unchecked ONNX behind.
    with atomic_file(out_path) as tmp_file:
        _export_into(model_dir, tmp_file, spec.opset, task.name, out_path)
        expected = collect(reference, validation_batches, task)
        got = collect(OrtRunner(tmp_file), validation_batches, task)
    artifact = Artifact(
        name="model.fp32", path=out_path, format="onnx", precision="fp32", stage="export",
        options={"opset": spec.opset, "task": task.name, "exporter": "optimum"},
    )
    max_diff, _ = max_abs_diff(expected, got, validation_batches, task.per_token)
    rows = sum(len(b["input_ids"]) for b in validation_batches)
    passed = max_diff <= spec.atol
    message = (
        f"max |{'/'.join(task.outputs)} diff| vs PyTorch {max_diff:.3g} {'<=' if passed else '>'} atol "
        f"{spec.atol} on {rows} rows"
    )
    return StageResult(
        stage="export", artifacts=[artifact], passed=passed, message=message,
        seconds=time.perf_counter() - started,
        details={"max_abs_diff": max_diff, "atol": spec.atol, "rows": int(rows), "task": task.name},
    )
