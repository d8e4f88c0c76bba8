"""Compare two release folders: are they the same release? For refactors, which must keep bytes.

    python bench/same_release.py release/minilm-tweets /tmp/before/release/minilm-tweets

Prints each file's sha256 in both (manifest.json, report.md and junit.xml carry times and paths,
so they are compared by their figures instead), then every artifact's figures from the two
manifests: agreement, max |diff|, metric drop and options, against PyTorch and against its source.
Where an ONNX file's bytes differ, it says whether its outputs on probe batches are identical
(max difference 0), the weaker promise a serializer change may keep. Exit 0 when every artifact is
byte-identical and every figure equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.artifacts import sha256_file  # noqa: E402

GENERATED = {"manifest.json", "report.md", "junit.xml", "manifest.json.sig"}


def figures(folder: Path) -> dict[str, tuple]:
    manifest = json.loads((folder / "manifest.json").read_text())
    out = {}
    for a in manifest["artifacts"]:
        p, s = a.get("parity") or {}, a.get("source_parity") or {}
        out[a["path"]] = (a["passed"], p.get("agreement"), p.get("max_abs_diff"), p.get("metric_drop"),
                          s.get("agreement"), s.get("max_abs_diff"), json.dumps(a["options"], sort_keys=True))
    return out


def same_outputs(a: Path, b: Path) -> float:
    """Largest difference between the two graphs' outputs on the probe batches `prove_runs` uses."""
    import numpy as np

    from pipeline.graph import model as graph_model
    from pipeline.graph.proof import probe_batches
    from pipeline.parity.runners import OrtRunner

    worst = 0.0
    for batch in probe_batches(graph_model.load(a)):
        x, y = OrtRunner(a).infer(batch), OrtRunner(b).infer(batch)
        worst = max([worst] + [float(np.abs(x[k].astype(float) - y[k].astype(float)).max()) for k in x])
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    names = sorted({p.name for p in args.a.iterdir() if p.is_file()} | {p.name for p in args.b.iterdir() if p.is_file()})
    same = True
    print(f"{'file':32} {'sha256 in A':14} {'sha256 in B':14} verdict")
    for name in names:
        if name in GENERATED:
            continue
        fa, fb = args.a / name, args.b / name
        ha = sha256_file(fa)[:12] if fa.is_file() else "-"
        hb = sha256_file(fb)[:12] if fb.is_file() else "-"
        verdict = "identical" if ha == hb else "DIFFERENT"
        if ha != hb and name.endswith(".onnx") and fa.is_file() and fb.is_file():
            verdict += f" (outputs differ by at most {same_outputs(fa, fb):.3g})"
        same &= ha == hb
        print(f"{name:32} {ha:14} {hb:14} {verdict}")
    fig_a, fig_b = figures(args.a), figures(args.b)
    print("\nfigures (passed, agreement, max|diff|, metric drop, vs source: agreement, max|diff|, options)")
    for path in sorted(set(fig_a) | set(fig_b)):
        equal = fig_a.get(path) == fig_b.get(path)
        same &= equal
        print(f"  {path:30} {'equal' if equal else 'DIFFERENT'}: {fig_a.get(path, ())[:6]}"
              + ("" if equal else f" vs {fig_b.get(path, ())[:6]}"))
    print("\nsame release" if same else "\nNOT the same release")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
