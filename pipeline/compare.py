"""Outputs of two runners -> a `ParityReport` whose truth value is the gate's verdict.

Written here rather than borrowed: Polygraphy compares tensors, but a release gate for a
classifier needs prediction agreement and label-metric drop on real rows, with the flipped
examples named, and it must fail the run rather than warn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.recipe import Gate


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean())


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@dataclass
class Flip:
    index: int
    text: str
    reference: str
    artifact: str
    label: str | None


@dataclass
class ParityReport:
    """Parity of one artifact against the reference on the evaluation rows."""

    artifact: str
    samples: int
    agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    gate: dict[str, Any]
    metric: str
    reference_metrics: dict[str, float] = field(default_factory=dict)
    artifact_metrics: dict[str, float] = field(default_factory=dict)
    metric_drop: float | None = None
    failures: list[str] = field(default_factory=list)
    flips: list[Flip] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data


def compare_logits(
    artifact: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    gate: Gate,
    metric: str = "accuracy",
    labels: np.ndarray | None = None,
    id2label: dict[int, str] | None = None,
    texts: list[str] | None = None,
    max_flips: int = 20,
) -> ParityReport:
    """Compare two logit matrices row by row and apply `gate`."""
    if reference.shape != candidate.shape:
        raise ValueError(f"{artifact}: logits shape {candidate.shape} != reference {reference.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    ref_pred, cand_pred = reference.argmax(-1), candidate.argmax(-1)
    names = id2label or {}
    report = ParityReport(
        artifact=artifact,
        samples=int(reference.shape[0]),
        agreement=float((ref_pred == cand_pred).mean()),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        gate=gate.model_dump(),
        metric=metric,
    )
    if labels is not None:
        num_classes = reference.shape[-1]
        for key, preds in (("reference_metrics", ref_pred), ("artifact_metrics", cand_pred)):
            setattr(report, key, {
                "accuracy": accuracy(preds, labels),
                "macro_f1": macro_f1(preds, labels, num_classes),
            })
        report.metric_drop = report.reference_metrics[metric] - report.artifact_metrics[metric]

    # Agreement and metric drops are ratios of counts: compare them with a tolerance so that
    # 8 rows of 400 (a drop of 0.02) meets a 0.02 limit despite float subtraction.
    eps = 1e-9
    if gate.min_agreement is not None and report.agreement < gate.min_agreement - eps:
        report.failures.append(f"agreement {report.agreement:.4f} < {gate.min_agreement}")
    if gate.max_abs_diff is not None and report.max_abs_diff > gate.max_abs_diff:
        report.failures.append(f"max |logit diff| {report.max_abs_diff:.3g} > {gate.max_abs_diff}")
    if gate.max_metric_drop is not None:
        if report.metric_drop is None:
            report.failures.append(f"{metric} drop is gated but the evaluation data has no labels")
        elif report.metric_drop > gate.max_metric_drop + eps:
            report.failures.append(f"{metric} drop {report.metric_drop:.4f} > {gate.max_metric_drop}")

    for i in np.flatnonzero(ref_pred != cand_pred)[:max_flips]:
        report.flips.append(Flip(
            index=int(i),
            text=texts[i] if texts else "",
            reference=names.get(int(ref_pred[i]), str(ref_pred[i])),
            artifact=names.get(int(cand_pred[i]), str(cand_pred[i])),
            label=names.get(int(labels[i]), str(labels[i])) if labels is not None else None,
        ))
    return report
