"""The end-of-run summary table printed by `shipyard run`."""

from __future__ import annotations

from pipeline.release.view import ReportView
from pipeline.run.workflow import RunOutcome


def print_run_summary(console, outcome: RunOutcome) -> None:
    from rich.markup import escape
    from rich.table import Table

    manifest = outcome.manifest
    view = ReportView.of(manifest)  # the figures report.md and report.html show
    table = Table(title=f"{view.name}: {view.verdict}")
    table.add_column("artifact", no_wrap=True)
    for column in ("prec", "MB", "agree", "max|diff|", "drop", "gate"):
        table.add_column(column)
    for art, row in zip(manifest.artifacts, view.artifacts, strict=True):
        drop = (art.parity or {}).get("metric_drop")
        table.add_row(
            row.path, row.precision, row.size_mb, f"{row.agreement_value or 0:.4f}", row.max_abs_diff,
            "n/a" if drop is None else f"{drop:+.4f}", "[green]pass[/]" if row.passed else "[red]FAIL[/]",
        )
    console.print(table)
    for art in manifest.artifacts:
        if art.source_parity:
            p = art.source_parity
            drop = p.get("metric_drop")
            console.print(f"{escape(art.path)} vs {escape(str(p.get('reference')))}: agreement {p['agreement']:.4f}"
                          + ("" if drop is None else f", drop {drop:+.4f}")
                          + (" [green]pass[/]" if p.get("passed") else " [red]FAIL[/]"))
    for stage in manifest.stages:
        if not stage.passed:
            console.print(f"[red]FAIL[/] {escape(stage.stage)}: {escape(stage.message)}")
    for target in manifest.targets:
        engine = f"engine {target.engine['path']}" if target.engine else f"engine: {target.engine_status}"
        ready = "ready" if target.readiness.get("ready") else "[red]NOT READY[/]"
        console.print(f"target {escape(target.name)} ({target.arch}, {target.precision}): {escape(target.onnx)} "
                      f"{ready}; {escape(engine)}")
    cache = manifest.invocation.cache if manifest.invocation else {}
    if cache.get("reused"):
        console.print(f"reused from the stage cache: {escape(', '.join(cache['reused']))}")
    if cache.get("damaged_and_recomputed"):
        console.print(f"[yellow]damaged cache entries recomputed[/]: {escape(', '.join(cache['damaged_and_recomputed']))}")
    if cache.get("evicted"):
        console.print(f"stage cache over its cap: {cache['evicted']} least recently used entries removed "
                      "(shipyard cache ls; SHIPYARD_CACHE_MAX_SIZE sets the cap)")
    console.print(f"release: {outcome.out} (manifest.json, report.md, report.html, junit.xml)")
