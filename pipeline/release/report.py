"""Human and CI renderings of a manifest: report.md, report.html (`pipeline.release.html`) and JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.names import NOT_ATTEMPTED
from pipeline.release.manifest import Manifest
from pipeline.release.view import ReportView, agreement_text, change_text, fmt


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(manifest: Manifest) -> str:
    view = ReportView.of(manifest)
    metric = view.metric
    lines = [
        f"# Shipyard release report: {view.name}",
        "",
        f"**Verdict: {view.verdict}** ({view.created_at})",
        "",
        f"Model `{view.model_path}` ({view.model_type}, sha256 `{view.model_sha}`).",
        "",
        "Parity is measured with ONNX Runtime's CPU execution provider against the PyTorch FP32 "
        "model on the evaluation rows.",
        "",
        "| data | source | rows | fingerprint |",
        "|---|---|---|---|",
    ]
    for d in view.data:
        lines.append(f"| {d.split} | `{d.source}` | {d.rows} | `{d.fingerprint}` |")
    lines += ["", "## Stages", "", "| stage | result | seconds | detail |", "|---|---|---|---|"]
    for stage in view.stages:
        lines.append(f"| {stage.stage} | {stage.verdict} | {stage.seconds} | {_cell(stage.message)} |")
    lines += [
        "", "## Artifacts", "",
        f"Task: {view.task}. Agreement is over {view.unit}: {view.agreement_means}.",
        "",
        f"| artifact | runtime | precision | size MB | agreement [95% interval] | max abs diff "
        f"| PyTorch {metric or 'metric'} | artifact {metric or 'metric'} | drop (McNemar p) | speed-up b1 / batch "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in view.artifacts:
        lines.append(
            f"| `{a.path}` | {a.runtime} | {a.precision} | {a.size_mb} | {a.agreement} "
            f"| {a.max_abs_diff} | {a.reference_metric} | {a.artifact_metric} | {a.change} | {a.speedup} "
            f"| {'pass' if a.passed else 'FAIL'} |"
        )
    if view.cpu_form:
        lines += ["", view.cpu_form]
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
            lines.append(f"| `{art.path}` | {agreement_text(p)} | {fmt(p.get('max_abs_diff'), '.3g')} "
                         f"| {fmt(ref)} | {fmt(got)} | {change_text(p)} "
                         f"| {'pass' if p.get('passed') else 'FAIL'} |")
    for art, p in converted:
        if p.get("details"):
            lines += ["", f"{art.name} vs {p.get('reference')}: "
                      + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in p["details"].items())]
        if p.get("failures"):
            lines += ["", f"### {art.name}: gate against {p.get('reference')} failed", ""]
            lines += [f"- {f}" for f in p["failures"]]
    for art in manifest.artifacts:
        p = art.parity or {}
        if p.get("failures"):
            lines += ["", f"### {art.name}: gate failed", ""] + [f"- {f}" for f in p["failures"]]
        if p.get("details"):
            lines += ["", f"{art.name}: " + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in p["details"].items())]
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
    from pipeline.release.html import render_html

    (Path(folder) / "report.md").write_text(render_markdown(manifest))
    (Path(folder) / "report.html").write_text(render_html(manifest))
    (Path(folder) / "junit.xml").write_text(render_junit(manifest))
