"""Parity of one artifact against the PyTorch reference on the evaluation rows, as a gate."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from pipeline.artifacts import Artifact, StageResult
from pipeline.parity.compare import ParityReport, compare
from pipeline.parity.runners import runner_for
from pipeline.parity.tasks import Task, collect
from pipeline.recipe import Gate

Batch = dict[str, np.ndarray]


def run(
    artifact: Artifact,
    reference: list[Batch],
    evaluation,
    gate: Gate,
    metric: str | None,
    id2label: dict[int, str],
    task: Task,
    progress: Callable[[int], None] | None = None,
) -> tuple[StageResult, ParityReport]:
    """Run the artifact on every evaluation batch (`evaluation` is a `pipeline.inputs.data.EvalSet`) and
    apply `gate` to its parity with the `reference` outputs."""
    started = time.perf_counter()
    # An engine's `version_compatible` option is set only by who vouches for it (the build in
    # this process, or a verified release's record): then, and only then, host code is allowed.
    host_code = artifact.options.get("version_compatible") is True
    # An engine runs only as the bytes its artifact record hashed (`runner_for`).
    outputs = collect(runner_for(artifact.path, artifact.format, host_code, artifact.sha256 or None), evaluation.batches, task,
                      progress)
    report = compare(task, artifact.name, reference, outputs, evaluation.batches, gate, metric,
                     evaluation.labels, id2label, evaluation.rows, evaluation.columns.text,
                     evaluation.columns.text_pair)
    message = "; ".join(report.failures) if report.failures else (
        f"agreement {report.agreement:.4f} over {report.units} {report.unit}, max |diff| {report.max_abs_diff:.3g}"
    )
    result = StageResult(
        stage=f"validate[{artifact.name}]", passed=report.passed, message=message,
        seconds=time.perf_counter() - started, details={"artifact": artifact.name},
    )
    return result, report
