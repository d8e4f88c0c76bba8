"""Parity of one artifact against the PyTorch reference on the evaluation rows, as a gate."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from pipeline.artifacts import Artifact, StageResult
from pipeline.compare import ParityReport, compare_logits
from pipeline.recipe import Gate
from pipeline.runners import collect_logits, runner_for

Batch = dict[str, np.ndarray]


def run(
    artifact: Artifact,
    reference_logits: np.ndarray,
    batches: list[Batch],
    gate: Gate,
    metric: str,
    labels: np.ndarray | None,
    id2label: dict[int, str],
    texts: list[str],
    progress: Callable[[int], None] | None = None,
) -> tuple[StageResult, ParityReport]:
    """Run the artifact on every evaluation batch and apply `gate` to its parity."""
    started = time.perf_counter()
    logits = collect_logits(runner_for(artifact.path), batches, progress)
    report = compare_logits(
        artifact.name, reference_logits, logits, gate, metric, labels, id2label, texts
    )
    message = "; ".join(report.failures) if report.failures else (
        f"agreement {report.agreement:.4f}, max |diff| {report.max_abs_diff:.3g}"
    )
    result = StageResult(
        stage=f"validate[{artifact.name}]", passed=report.passed, message=message,
        seconds=time.perf_counter() - started, details={"artifact": artifact.name},
    )
    return result, report
