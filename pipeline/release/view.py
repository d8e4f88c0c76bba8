"""One view of a manifest for the renderings people read: report.md and report.html take their
verdict, tables and figures from it, so the two never disagree on a number or its format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.names import NOT_ATTEMPTED
from pipeline.release.manifest import Manifest
from pipeline.runtimes import RUNTIMES
from pipeline.tasks import TASK_SPECS


def fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def agreement_text(parity: dict) -> str:
    """Agreement with its 95% interval: "0.9880 [0.979, 0.993]"."""
    interval = parity.get("agreement_interval")
    text = fmt(parity.get("agreement"))
    return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else text


def change_text(parity: dict) -> str:
    """The label metric's drop and, for classification, McNemar's p-value of the accuracy change."""
    test = parity.get("mcnemar")
    text = fmt(parity.get("metric_drop"))
    return f"{text} (p {test['p_value']:.2g})" if test else text


def stage_verdict(stage) -> str:
    if stage.details.get("status") in NOT_ATTEMPTED:
        return "skipped"
    return "pass" if stage.passed else "FAIL"


@dataclass(frozen=True)
class ArtifactRow:
    name: str
    path: str
    precision: str
    size_bytes: int
    size_mb: str
    agreement: str
    agreement_value: float | None
    interval: tuple[float, float] | None
    max_abs_diff: str
    reference_metric: str
    artifact_metric: str
    change: str
    passed: bool
    distributions: dict[str, Any]
    runtime: str = ""
    speedup: str = "-"  # a CPU INT8 artifact's measured speed-up over its float source, batch 1 / batch


@dataclass(frozen=True)
class StageRow:
    stage: str
    verdict: str
    seconds: str
    message: str


@dataclass(frozen=True)
class DataRow:
    split: str
    source: str
    rows: int
    fingerprint: str
    lengths: dict[str, Any]


@dataclass(frozen=True)
class ReportView:
    name: str
    passed: bool
    verdict: str
    created_at: str
    model_path: str
    model_type: str
    model_sha: str
    task: str
    unit: str
    agreement_means: str
    metric: str | None
    artifacts: list[ArtifactRow]
    stages: list[StageRow]
    data: list[DataRow]
    profiles: list[tuple[str, int, int]] = field(default_factory=list)  # target, shortest and longest sequence
    budget_trials: list[dict[str, float]] = field(default_factory=list)
    recovery_curve: list[dict[str, float]] = field(default_factory=list)
    cpu_form: str = ""  # which CPU artifact is the release's CPU form, why, and where it was timed

    @classmethod
    def of(cls, manifest: Manifest) -> ReportView:
        metric = next((a.parity.get("metric") for a in manifest.artifacts if a.parity and a.parity.get("metric")), None)
        task = manifest.model.task
        form = manifest.cpu_form or {}
        speed = {c["artifact"]: c for c in form.get("candidates", [])}
        artifacts = []
        for art in manifest.artifacts:
            p = art.parity or {}
            interval = p.get("agreement_interval")
            artifacts.append(ArtifactRow(
                name=art.name, path=art.path, precision=art.precision, size_bytes=art.size_bytes,
                size_mb=f"{art.size_bytes / 1e6:.1f}", agreement=agreement_text(p), agreement_value=p.get("agreement"),
                interval=(interval[0], interval[1]) if interval else None, max_abs_diff=fmt(p.get("max_abs_diff"), ".3g"),
                reference_metric=fmt((p.get("reference_metrics") or {}).get(metric) if metric else None),
                artifact_metric=fmt((p.get("artifact_metrics") or {}).get(metric) if metric else None),
                change=change_text(p), passed=art.passed, distributions=p.get("distributions") or {},
                runtime=RUNTIMES[art.format].name,
                speedup=(f"{speed[art.name]['speedup'][0]:.2f}x / {speed[art.name]['speedup'][1]:.2f}x"
                         if art.name in speed else "-")))
        stages = [StageRow(s.stage, stage_verdict(s), f"{s.seconds:.1f}", s.message) for s in manifest.stages]
        data = [DataRow(split, str(r.source), r.rows, r.fingerprint[:12], r.token_lengths)
                for split, r in manifest.data.items()]
        profiles = []
        for target in manifest.targets:
            sequences = [p["sequence"] for p in target.target.get("profiles", []) if "sequence" in p]
            if sequences:
                profiles.append((target.name, min(s["min"] for s in sequences), max(s["max"] for s in sequences)))
        trials = next((s.details.get("budget_trials") for s in manifest.stages if s.stage == "prune"
                       and s.details.get("budget_trials")), None) or []
        recovery = next((s.details.get("recovery", {}).get("curve") for s in manifest.stages if s.stage == "recover"),
                        None) or []
        return cls(
            name=manifest.recipe_name, passed=manifest.passed, verdict="PASSED" if manifest.passed else "FAILED",
            created_at=manifest.created_at, model_path=manifest.model.path, model_type=manifest.model.model_type,
            model_sha=manifest.model.sha256[:12], task=task,
            unit=str(next((a.parity.get("unit") for a in manifest.artifacts if a.parity), "rows")),
            agreement_means=TASK_SPECS[task].agreement if task in TASK_SPECS else "", metric=metric,
            artifacts=artifacts, stages=stages, data=data, profiles=profiles, budget_trials=list(trials),
            recovery_curve=[c for c in recovery if c.get("agreement") is not None], cpu_form=cpu_form_text(form))


def cpu_form_text(form: dict[str, Any]) -> str:
    """One sentence on the release's CPU form: which artifact, why, and on which CPU it was timed."""
    if not form:
        return ""
    timed = (f"; speed-ups over {form['source']} at batch 1 / {form['batch_rows']} measured on {form['cpu']} "
             f"({form['cpu_flags']}, {form['threads']} threads)" if form.get("candidates") else "")
    return f"CPU form: {form['artifact']} on {form['runtime']} ({form['why']}){timed}."
