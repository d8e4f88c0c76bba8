"""report.html: the release report to look at, one self-contained file (inline SVG, no fetches).

Drawn from the manifest alone, through the same view of it report.md uses (`pipeline.release.view`):
per artifact its agreement with the 95% interval; how far its outputs drift from PyTorch's (the
largest |difference| per row or scored token); for classes, PyTorch's margin on every row against
the rows that flipped (whether what flipped sat near the boundary); the calibration and evaluation
rows' token lengths against the targets' profiles; the prune budget search and the recovery curve
where the run made them; the artifacts' sizes. matplotlib draws each plot as SVG, inlined; Jinja2
lays out the page.
"""

from __future__ import annotations

import io
from typing import Any

from pipeline.release.manifest import Manifest
from pipeline.release.view import ReportView

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Shipyard release report: {{ v.name }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } .pass { color: #17692a; } .fail { color: #b00020; font-weight: bold; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: .9em; }
</style></head><body>
<h1>Shipyard release report: {{ v.name }}</h1>
<p class="{{ 'pass' if v.passed else 'fail' }}"><b>Verdict: {{ v.verdict }}</b> ({{ v.created_at }})</p>
<p>Model <code>{{ v.model_path }}</code> ({{ v.model_type }}, task {{ v.task }}). Agreement is over {{ v.unit }}:
{{ v.agreement_means }}.</p>
<h2>Artifacts</h2>
<table id="artifacts"><tr><th>artifact</th><th>runtime</th><th>precision</th><th>size MB</th><th>agreement [95% interval]</th>
<th>max abs diff</th><th>PyTorch {{ v.metric or 'metric' }}</th><th>artifact {{ v.metric or 'metric' }}</th>
<th>drop (McNemar p)</th><th>speed-up b1 / batch</th><th>verdict</th></tr>
{% for a in v.artifacts %}<tr><td><code>{{ a.path }}</code></td><td>{{ a.runtime }}</td><td>{{ a.precision }}</td>
<td>{{ a.size_mb }}</td><td>{{ a.agreement }}</td><td>{{ a.max_abs_diff }}</td><td>{{ a.reference_metric }}</td>
<td>{{ a.artifact_metric }}</td><td>{{ a.change }}</td><td>{{ a.speedup }}</td><td class="{{ 'pass' if a.passed else 'fail' }}">{{ 'pass' if a.passed else 'FAIL' }}</td></tr>
{% endfor %}</table>
{% if v.cpu_form %}<p id="cpu-form">{{ v.cpu_form }}</p>{% endif %}
{% for plot in plots %}<figure class="plot" id="{{ plot.id }}">{{ plot.svg | safe }}
<figcaption>{{ plot.caption }}</figcaption></figure>
{% endfor %}
<h2>Stages</h2>
<table><tr><th>stage</th><th>result</th><th>seconds</th><th>detail</th></tr>
{% for s in v.stages %}<tr><td>{{ s.stage }}</td><td>{{ s.verdict }}</td><td>{{ s.seconds }}</td><td>{{ s.message }}</td></tr>
{% endfor %}</table>
<h2>Data</h2>
<table><tr><th>split</th><th>source</th><th>rows</th><th>fingerprint</th></tr>
{% for d in v.data %}<tr><td>{{ d.split }}</td><td><code>{{ d.source }}</code></td><td>{{ d.rows }}</td>
<td><code>{{ d.fingerprint }}</code></td></tr>{% endfor %}</table>
</body></html>
"""


def _svg(figure) -> str:
    """The figure as inline SVG: text kept as text, no date, stable ids."""
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float = 9.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "shipyard", "font.size": 9})
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _agreement_plot(view: ReportView) -> dict[str, str] | None:
    rows = [a for a in view.artifacts if a.agreement_value is not None]
    if not rows:
        return None
    figure, axes = _figure(9, 0.45 * len(rows) + 1)
    for i, a in enumerate(rows):
        value = float(a.agreement_value or 0.0)
        low, high = a.interval or (value, value)
        axes.errorbar([value], [i], xerr=[[value - low], [high - value]],
                      fmt="o", color="#17692a" if a.passed else "#b00020", capsize=4)
    axes.set_yticks(range(len(rows)), [a.name for a in rows])
    axes.set_xlabel(f"agreement with PyTorch ({view.unit})")
    axes.grid(axis="x", alpha=.3)
    return {"id": "plot-agreement", "svg": _svg(figure),
            "caption": "Agreement per artifact with its 95% interval (Wilson): red where its gate failed."}


def _difference_plot(view: ReportView) -> dict[str, str] | None:
    rows = [a for a in view.artifacts if a.distributions.get("abs_diff")]
    if not rows:
        return None
    figure, axes = _figure()
    edges = rows[0].distributions["abs_diff"]["edges"]
    labels = ["0"] + [f"≤1e{e}" for e in range(-8, 3)]
    for a in rows:
        axes.plot(range(len(edges) - 1), a.distributions["abs_diff"]["counts"], marker="o", label=a.name)
    axes.set_xticks(range(len(edges) - 1), labels[: len(edges) - 1])
    axes.set_xlabel(f"largest |difference| from PyTorch per {view.unit[:-1] if view.unit.endswith('s') else view.unit}")
    axes.set_ylabel(view.unit)
    axes.legend(fontsize=7)
    axes.grid(alpha=.3)
    return {"id": "plot-differences", "svg": _svg(figure),
            "caption": "How far each artifact's outputs drift from PyTorch's, as a histogram over log-spaced bins."}


def _margin_plot(view: ReportView) -> dict[str, str] | None:
    rows = [a for a in view.artifacts if a.distributions.get("margin")]
    if not rows:
        return None
    figure, axes = _figure()
    edges = rows[0].distributions["margin"]["edges"]
    centres = [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:], strict=False)]
    width = edges[1] - edges[0]
    axes.bar(centres, rows[0].distributions["margin"]["all"], width=width, color="#ccd", label="all rows")
    for a in rows:
        flipped = a.distributions["margin"]["flipped"]
        if any(flipped):
            axes.bar(centres, flipped, width=width * 0.6, alpha=.8, label=f"flipped: {a.name}")
    axes.set_xlabel("PyTorch's margin (top probability minus the next)")
    axes.set_ylabel("rows")
    axes.set_yscale("symlog")
    axes.legend(fontsize=7)
    return {"id": "plot-margins", "svg": _svg(figure),
            "caption": "Where flipped rows sit: near 0 they were on the boundary already; far from it, the artifact "
                       "changed a confident prediction."}


def _length_plot(view: ReportView) -> dict[str, str] | None:
    splits = [d for d in view.data if d.lengths and any(d.lengths["counts"])]
    if not splits:
        return None
    figure, axes = _figure()
    edges = splits[0].lengths["edges"]
    positions = range(len(edges) - 1)
    width = 0.8 / len(splits)
    for i, d in enumerate(splits):
        axes.bar([p + i * width for p in positions], d.lengths["counts"], width=width, label=f"{d.split} (max {d.lengths['max']})")
    axes.set_xticks([p + 0.4 - width / 2 for p in positions], [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:], strict=False)])
    for name, low, high in view.profiles:
        for bound, style in ((low, ":"), (high, "--")):
            index = next((i for i, (lo, hi) in enumerate(zip(edges, edges[1:], strict=False)) if lo < bound <= hi), None)
            if index is not None:
                axes.axvline(index + 0.4, linestyle=style, color="#b00020", alpha=.6)
        axes.plot([], [], linestyle="--", color="#b00020", label=f"{name}: sequence {low}-{high}")
    axes.set_xlabel("tokens per row")
    axes.set_ylabel("rows")
    axes.legend(fontsize=7)
    return {"id": "plot-lengths", "svg": _svg(figure),
            "caption": "Token lengths of the calibration and evaluation rows against each target's profile range."}


def _curve(plot_id: str, xs: list[float], ys: list[float], xlabel: str, caption: str) -> dict[str, str]:
    figure, axes = _figure(6, 3)
    axes.plot(xs, ys, "o-")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("tuning agreement")
    axes.grid(alpha=.3)
    return {"id": plot_id, "svg": _svg(figure), "caption": caption}


def _search_plots(view: ReportView) -> list[dict[str, str]]:
    plots = []
    if view.budget_trials:
        plots.append(_curve("plot-budget", [t["ffn_fraction"] for t in view.budget_trials],
                            [t["agreement"] for t in view.budget_trials], "FFN fraction pruned",
                            "The prune budget search's trials."))
    if view.recovery_curve:
        plots.append(_curve("plot-recovery", [c["step"] for c in view.recovery_curve],
                            [c["agreement"] for c in view.recovery_curve], "recovery step",
                            "Recovery by distillation: agreement per check."))
    return plots


def _size_plot(view: ReportView) -> dict[str, str]:
    figure, axes = _figure(9, 0.35 * len(view.artifacts) + 1)
    axes.barh([a.name for a in view.artifacts], [a.size_bytes / 1e6 for a in view.artifacts], color="#779")
    axes.set_xlabel("size (MB)")
    return {"id": "plot-sizes", "svg": _svg(figure), "caption": "Artifact sizes (external data included)."}


def render_html(manifest: Manifest) -> str:
    from jinja2 import Environment

    view = ReportView.of(manifest)
    plots: list[Any] = [p for p in (_agreement_plot(view), _difference_plot(view), _margin_plot(view),
                                    _length_plot(view)) if p]
    plots += _search_plots(view)
    if view.artifacts:
        plots.append(_size_plot(view))
    return Environment(autoescape=True).from_string(TEMPLATE).render(v=view, plots=plots)
