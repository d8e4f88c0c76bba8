"""Outputs of two runners -> a `ParityReport` whose truth value is the gate's verdict.

Written here rather than borrowed: Polygraphy compares tensors, but a release gate needs
prediction agreement and label-metric drop on real rows, per task (classes, entity tags, answer
spans, embeddings; see `pipeline.parity.tasks`), with the flipped examples named, and it must fail the
run rather than warn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from calibration.encode import split_words
from pipeline.errors import ArtifactError
from pipeline.parity.metrics import accuracy, entity_scores, macro_f1, squad_scores
from pipeline.parity.tasks import Task, answers, cosine, distributions, max_abs_diff, row_tags
from pipeline.parity.uncertainty import mcnemar_exact, wilson
from pipeline.recipe import Gate

Batch = dict[str, np.ndarray]

# The speed gate's keys: timed by the run (`pipeline.run.speed`), not part of a parity verdict.
SPEED_KEYS = {"min_speedup", "on_slow"}


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
    metric: str | None
    task: str
    units: int = 0  # how many predictions agreement counts over
    unit: str = "rows"  # rows, or scored tokens for token classification
    details: dict[str, Any] = field(default_factory=dict)
    reference_metrics: dict[str, float] = field(default_factory=dict)
    artifact_metrics: dict[str, float] = field(default_factory=dict)
    metric_drop: float | None = None
    agreement_interval: list[float] | None = None  # 95% Wilson interval over `units`
    mcnemar: dict[str, Any] | None = None  # exact test of the accuracy change (classification, with labels)
    failures: list[str] = field(default_factory=list)
    flips: list[Flip] = field(default_factory=list)
    # Histograms the HTML report draws (`pipeline.parity.tasks.distributions`): how far outputs drift,
    # and for classes how near the boundary flipped rows were.
    distributions: dict[str, Any] = field(default_factory=dict)

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
        raise _shape_error(artifact, "logits", candidate.shape, reference.shape)
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    ref_pred, cand_pred = reference.argmax(-1), candidate.argmax(-1)
    names = id2label or {}
    report = ParityReport(
        artifact=artifact,
        samples=int(reference.shape[0]),
        agreement=float((ref_pred == cand_pred).mean()),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        gate=gate.model_dump(exclude=SPEED_KEYS),
        metric=metric,
        task="text-classification",  # what logits per row are
        units=int(reference.shape[0]),
    )
    if labels is not None:
        num_classes = reference.shape[-1]
        for key, preds in (("reference_metrics", ref_pred), ("artifact_metrics", cand_pred)):
            setattr(report, key, {
                "accuracy": accuracy(preds, labels),
                "macro_f1": macro_f1(preds, labels, num_classes),
            })
        report.metric_drop = report.reference_metrics[metric] - report.artifact_metrics[metric]
        report.mcnemar = mcnemar_exact(ref_pred == labels, cand_pred == labels)

    apply_gate(report, gate)
    for i in np.flatnonzero(ref_pred != cand_pred)[:max_flips]:
        report.flips.append(Flip(
            index=int(i),
            text=texts[i] if texts else "",
            reference=names.get(int(ref_pred[i]), str(ref_pred[i])),
            artifact=names.get(int(cand_pred[i]), str(cand_pred[i])),
            label=names.get(int(labels[i]), str(labels[i])) if labels is not None else None,
        ))
    return report


def apply_gate(report: ParityReport, gate: Gate) -> None:
    """Record the agreement's 95% interval, then every threshold of `gate` the report misses in
    `report.failures`."""
    # Agreement and metric drops are ratios of counts: compare them with a tolerance so that
    # 8 rows of 400 (a drop of 0.02) meets a 0.02 limit despite float subtraction.
    eps = 1e-9
    low, high = wilson(round(report.agreement * report.units), report.units)
    report.agreement_interval = [round(low, 6), round(high, 6)]
    if gate.min_agreement is not None and report.agreement < gate.min_agreement - eps:
        report.failures.append(f"agreement {report.agreement:.4f} < {gate.min_agreement}")
    if gate.min_agreement_lower is not None and low < gate.min_agreement_lower - eps:
        report.failures.append(f"agreement's 95% lower bound {low:.4f} < {gate.min_agreement_lower} "
                               f"({report.units} {report.unit})")
    if gate.max_abs_diff is not None and report.max_abs_diff > gate.max_abs_diff:
        report.failures.append(f"max |output diff| {report.max_abs_diff:.3g} > {gate.max_abs_diff}")
    if gate.max_metric_drop is not None:
        if report.metric_drop is None:
            report.failures.append(f"{report.metric} drop is gated but the evaluation data has no labels")
        elif report.metric_drop > gate.max_metric_drop + eps:
            report.failures.append(f"{report.metric} drop {report.metric_drop:.4f} > {gate.max_metric_drop}")


def compare(task: Task, artifact: str, reference: list[Batch], candidate: list[Batch], batches: list[Batch],
            gate: Gate, metric: str | None, gold: Any, id2label: dict[int, str], rows: list[dict],
            text_column: str, pair_column: str | None, max_flips: int = 20) -> ParityReport:
    """Compare two runs of one task on the evaluation batches and apply `gate`; NaN or Inf in the
    candidate's outputs fails it, whatever the agreement says (an argmax of NaN is still a class)."""
    for ref, cand in zip(reference, candidate, strict=True):
        for name in ref.keys() & cand.keys():
            if np.shape(ref[name]) != np.shape(cand[name]):
                raise _shape_error(artifact, name, np.shape(cand[name]), np.shape(ref[name]))
    report = _compare(task, artifact, reference, candidate, batches, gate, metric, gold, id2label, rows,
                      text_column, pair_column, max_flips)
    bad = [i for i, row in enumerate(r for out in candidate for r in _rows_finite(out)) if not row]
    if bad:
        report.failures.insert(0, f"{len(bad)} of {report.samples} rows have NaN or Inf outputs (first: row {bad[0] + 1})")
    return report


def _shape_error(artifact: str, output: str, got: tuple, expected: tuple) -> ArtifactError:
    return ArtifactError(f"artifact {artifact}: output {output} has shape {tuple(got)} where the reference's has "
                         f"{tuple(expected)}; it is not a graph of this model (another number of labels?): pass the "
                         "--reference model it was exported from")


def _rows_finite(outputs: Batch) -> list[bool]:
    """Per row of a batch: are all its outputs finite?"""
    arrays = [np.asarray(v) for v in outputs.values()]
    rows = len(arrays[0]) if arrays else 0
    return [all(np.isfinite(a[i]).all() for a in arrays) for i in range(rows)]


def _compare(task: Task, artifact: str, reference: list[Batch], candidate: list[Batch], batches: list[Batch],
             gate: Gate, metric: str | None, gold: Any, id2label: dict[int, str], rows: list[dict],
             text_column: str, pair_column: str | None, max_flips: int) -> ParityReport:
    report = _compare_units(task, artifact, reference, candidate, batches, gate, metric, gold, id2label, rows,
                            text_column, pair_column, max_flips)
    report.distributions = distributions(task, reference, candidate, batches)
    return report


def _compare_units(task: Task, artifact: str, reference: list[Batch], candidate: list[Batch], batches: list[Batch],
             gate: Gate, metric: str | None, gold: Any, id2label: dict[int, str], rows: list[dict],
             text_column: str, pair_column: str | None, max_flips: int) -> ParityReport:
    if task.spec.kind == "class":
        texts = [str(r[text_column]) for r in rows]
        return compare_logits(artifact, np.concatenate([r["logits"] for r in reference]),
                              np.concatenate([c["logits"] for c in candidate]), gate, metric or "accuracy",
                              gold, id2label, texts, max_flips)
    largest, mean = max_abs_diff(reference, candidate, batches, task.per_token)
    ref_pred, cand_pred = task.predictions(reference, batches), task.predictions(candidate, batches)
    agree = task.agreement(ref_pred, cand_pred)
    report = ParityReport(
        artifact=artifact, samples=len(rows), agreement=float(agree.mean()) if agree.size else 1.0,
        max_abs_diff=largest, mean_abs_diff=mean, gate=gate.model_dump(exclude=SPEED_KEYS), metric=metric, task=task.name,
        units=int(agree.size), unit=task.spec.unit,
    )
    if task.spec.kind == "tag":
        _token_details(report, reference, candidate, batches, gold, id2label, rows, text_column, max_flips)
    elif task.spec.kind == "span":
        _span_details(report, ref_pred, cand_pred, batches, gold, rows, text_column, pair_column, max_flips)
    else:
        _embedding_details(report, ref_pred, cand_pred, task, rows, text_column, max_flips)
    if report.reference_metrics and metric is not None:
        report.metric_drop = report.reference_metrics[metric] - report.artifact_metrics[metric]
    apply_gate(report, gate)
    return report


def _token_details(report, reference, candidate, batches, gold, id2label, rows, text_column, max_flips) -> None:
    ref_tags, cand_tags = row_tags(reference, batches, id2label), row_tags(candidate, batches, id2label)
    if gold is not None:
        scored_gold = [g[: len(t)] for g, t in zip(gold, ref_tags, strict=True)]  # words cut by max_length are not scored
        report.reference_metrics = entity_scores(scored_gold, ref_tags)
        report.artifact_metrics = entity_scores(scored_gold, cand_tags)
    for i, (r, c) in enumerate(zip(ref_tags, cand_tags, strict=True)):
        if r != c and len(report.flips) < max_flips:
            words = split_words(rows[i][text_column])[: len(r)]
            report.flips.append(Flip(index=i, text=" ".join(words), reference=" ".join(r), artifact=" ".join(c),
                                     label=" ".join(gold[i][: len(r)]) if gold is not None else None))


def _span_details(report, ref_spans, cand_spans, batches, gold, rows, text_column, pair_column, max_flips) -> None:
    ref_answers = answers(ref_spans, batches, [str(r[pair_column]) for r in rows])
    cand_answers = answers(cand_spans, batches, [str(r[pair_column]) for r in rows])
    if gold is not None:
        report.reference_metrics = squad_scores(ref_answers, gold)
        report.artifact_metrics = squad_scores(cand_answers, gold)
    for i in np.flatnonzero((ref_spans != cand_spans).any(axis=-1))[:max_flips]:
        report.flips.append(Flip(index=int(i), text=str(rows[i][text_column]), reference=ref_answers[i],
                                 artifact=cand_answers[i], label=" | ".join(gold[i]) if gold is not None else None))


def _embedding_details(report, reference, candidate, task, rows, text_column, max_flips) -> None:
    similarity = cosine(reference, candidate)

    def nearest(embeddings: np.ndarray) -> np.ndarray:
        unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
        scores = unit @ unit.T
        np.fill_diagonal(scores, -np.inf)
        return scores.argmax(-1)

    report.details = {
        "min_cosine": task.min_cosine, "mean_cosine": float(similarity.mean()),
        "lowest_cosine": float(similarity.min()) if similarity.size else 1.0,
        "nearest_neighbour_unchanged": float((nearest(reference) == nearest(candidate)).mean())
        if len(reference) > 1 else 1.0,
    }
    for i in np.argsort(similarity)[:max_flips]:
        if similarity[i] < task.min_cosine:
            report.flips.append(Flip(index=int(i), text=str(rows[i][text_column]), reference="",
                                     artifact=f"cosine {similarity[i]:.4f}", label=None))
