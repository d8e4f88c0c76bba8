"""Human and CI renderings of a manifest: report.md and JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.names import NOT_ATTEMPTED
from pipeline.release.manifest import Manifest
from pipeline.tasks import TASK_SPECS


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _agreement(parity: dict) -> str:
    """Agreement with its 95% interval: "0.9880 [0.979, 0.993]"."""
    interval = parity.get("agreement_interval")
    text = _fmt(parity.get("agreement"))
    return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else text


def _change(parity: dict) -> str:
    """The label metric's drop and, for classification, McNemar's p-value of the accuracy change."""
    test = parity.get("mcnemar")
    text = _fmt(parity.get("metric_drop"))
    return f"{text} (p {test['p_value']:.2g})" if test else text


def _stage_verdict(stage) -> str:
    if stage.details.get("status") in NOT_ATTEMPTED:
        return "skipped"
    return "pass" if stage.passed else "FAIL"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(manifest: Manifest) -> str:
    verdict = "PASSED" if manifest.passed else "FAILED"
    lines = [
        f"# Shipyard release report: {manifest.recipe_name}",
        "",
        f"**Verdict: {verdict}** ({manifest.created_at})",
        "",
        f"Model `{manifest.model.path}` ({manifest.model.model_type}, sha256 `{manifest.model.sha256[:12]}`).",
        "",
        "Parity is measured with ONNX Runtime's CPU execution provider against the PyTorch FP32 "
        "model on the evaluation rows.",
        "",
        "| data | source | rows | fingerprint |",
        "|---|---|---|---|",
    ]
    for split, record in manifest.data.items():
        lines.append(f"| {split} | `{record.source}` | {record.rows} | `{record.fingerprint[:12]}` |")
    lines += ["", "## Stages", "", "| stage | result | seconds | detail |", "|---|---|---|---|"]
    for stage in manifest.stages:
        lines.append(f"| {stage.stage} | {_stage_verdict(stage)} | {stage.seconds:.1f} | {_cell(stage.message)} |")
    metric = next((a.parity.get("metric") for a in manifest.artifacts if a.parity and a.parity.get("metric")), None)
    task = manifest.model.task
    unit = next((a.parity.get("unit") for a in manifest.artifacts if a.parity), "rows")
    lines += [
        "", "## Artifacts", "",
        f"Task: {task}. Agreement is over {unit}: {TASK_SPECS[task].agreement if task in TASK_SPECS else ''}.",
        "",
        f"| artifact | precision | size MB | agreement [95% interval] | max abs diff | PyTorch {metric or 'metric'} "
        f"| artifact {metric or 'metric'} | drop (McNemar p) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for art in manifest.artifacts:
        p = art.parity or {}
        ref = (p.get("reference_metrics") or {}).get(metric) if metric else None
        got = (p.get("artifact_metrics") or {}).get(metric) if metric else None
        lines.append(
            f"| `{art.path}` | {art.precision} | {art.size_bytes / 1e6:.1f} | {_agreement(p)} "
            f"| {_fmt(p.get('max_abs_diff'), '.3g')} | {_fmt(ref)} | {_fmt(got)} | {_change(p)} "
            f"| {'pass' if art.passed else 'FAIL'} |"
        )
    converted = [(a, a.source_parity) for a in manifest.artifacts if a.source_parity]
    if converted:
        source = converted[0][1].get("reference", "the pruned graph")
        lines += [
            "", "### Against the pruned graph they were made from", "",
            f"Artifacts converted from `{source}` answer to two gates: the pruned gate against PyTorch "
            "(above: what the compressed release loses in all) and their precision's gate against "
            f"`{source}` (below: what the conversion lost).",
            "",
            f"| artifact | agreement [95% interval] | max abs diff | source {metric or 'metric'} "
            f"| artifact {metric or 'metric'} | drop (McNemar p) | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for art, p in converted:
            ref = (p.get("reference_metrics") or {}).get(metric) if metric else None
            got = (p.get("artifact_metrics") or {}).get(metric) if metric else None
            lines.append(f"| `{art.path}` | {_agreement(p)} | {_fmt(p.get('max_abs_diff'), '.3g')} "
                         f"| {_fmt(ref)} | {_fmt(got)} | {_change(p)} "
                         f"| {'pass' if p.get('passed') else 'FAIL'} |")
    for art, p in converted:
        if p.get("details"):
            lines += ["", f"{art.name} vs {p.get('reference')}: "
                      + ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in p["details"].items())]
        if p.get("failures"):
            lines += ["", f"### {art.name}: gate against {p.get('reference')} failed", ""]
            lines += [f"- {f}" for f in p["failures"]]
    for art in manifest.artifacts:
        p = art.parity or {}
        if p.get("failures"):
            lines += ["", f"### {art.name}: gate failed", ""] + [f"- {f}" for f in p["failures"]]
        if p.get("details"):
            lines += ["", f"{art.name}: " + ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in p["details"].items())]
        if p.get("flips"):
            lines += ["", f"### {art.name}: predictions that flipped vs PyTorch", "",
                      "| row | label | PyTorch | artifact | text |", "|---|---|---|---|---|"]
            for flip in p["flips"]:
                text = _cell(flip["text"])[:200]
                lines.append(f"| {flip['index']} | {flip['label'] or ''} | {flip['reference']} | {flip['artifact']} | {text} |")
    if manifest.targets:
        lines += [
            "", "## TensorRT targets", "",
            "Parity of the TensorRT-ready ONNX files above is ONNX Runtime's CPU emulation of their "
            "typed graphs (float16 and Q/DQ emulated on the CPU), not the engine's; an engine's own "
            "parity is measured where it was built, on its GPU.",
            "", "| target | arch | precision | ONNX | readiness | engine |", "|---|---|---|---|---|---|",
        ]
        for t in manifest.targets:
            ready = "ready" if t.readiness.get("ready") else f"NOT READY ({len(t.readiness.get('findings', []))} findings)"
            engine = (f"built: `{t.engine['path']}` on {t.engine['gpu_name']} ({t.engine['compute_capability']}), "
                      f"TensorRT {t.engine['trt_version']}" if t.engine else f"{t.engine_status}: {_cell(t.engine_reason)}")
            lines.append(f"| {t.name} | {t.arch} | {t.precision} | `{t.onnx}` | {ready} | {engine} |")
        for t in manifest.targets:
            if t.readiness.get("findings"):
                lines += ["", f"### {t.name}: TensorRT readiness findings", ""]
                lines += [f"- `{f['node']}`: {f['message']} [{f['rule']}]" for f in t.readiness["findings"][:50]]
    lines += ["", "## Tools", ""] + [f"- {k} {v}" for k, v in manifest.tools.items()]
    return "\n".join(lines) + "\n"


def render_junit(manifest: Manifest) -> str:
    """One test case per gate: the export check, each artifact's parity, each target's readiness
    and engine build (skipped, with the reason, where this machine cannot build it)."""
    suite = ET.Element("testsuite", name=f"shipyard.{manifest.recipe_name}")
    failures = 0
    skipped = 0
    for stage in manifest.stages:
        if not stage.stage.startswith(("export", "validate", "trt-check", "build")):
            continue
        case = ET.SubElement(suite, "testcase", classname=f"shipyard.{manifest.recipe_name}",
                             name=stage.stage, time=f"{stage.seconds:.3f}")
        if stage.details.get("status") in NOT_ATTEMPTED:  # deferred, not ready, or no GPU here
            skipped += 1
            ET.SubElement(case, "skipped", message=stage.message)
        elif not stage.passed:
            failures += 1
            ET.SubElement(case, "failure", message=stage.message).text = stage.message
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", str(skipped))
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def write_reports(manifest: Manifest, folder: Path) -> None:
    (Path(folder) / "report.md").write_text(render_markdown(manifest))
    (Path(folder) / "junit.xml").write_text(render_junit(manifest))
