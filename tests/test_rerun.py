"""A build release engineers can trust: the held-out gate, the stage cache, determinism, and
a run killed with SIGKILL that the next run finishes with the same bytes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import invoke, write_recipe


def recipe_for(folder: Path, tiny, data: Path, **data_section) -> Path:
    """INT8 (Q/DQ, with its float fallback) and light pruning on few rows: every choosing stage."""
    path = write_recipe(folder, tiny.model, data, stages={
        "prune": {"enabled": True, "ffn_fraction": 0.1},
        "quantize": {"formats": ["qdq"], "fallback": {"max_nodes": 2, "min_agreement": 0.999}}},
        thresholds={"int8": {"min_agreement": 0.5, "max_metric_drop": 0.5},
                    "pruned": {"min_agreement": 0.5, "max_metric_drop": 0.5}},
        data={"calibration": {"samples": 48}, "tuning_samples": 48, "evaluation": {"samples": 96}, "max_length": 32,
              **data_section})
    return path


def hashes(folder: Path) -> dict[str, str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {a["path"]: a["sha256"] for a in manifest["artifacts"]}


def figures(folder: Path) -> list:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [(a["path"], a["parity"]["agreement"], a["parity"]["max_abs_diff"], a["parity"]["metric_drop"],
             a["options"]) for a in manifest["artifacts"]]


def test_tuning_rows_are_held_out_and_recorded(tiny_release, tiny, tiny_holdout_small, tmp_path):
    """The rows that choose (fallback) never overlap the rows that judge, nor the calibration rows.
    Shown on files of exactly as many distinct rows as the three splits ask for: with disjoint
    splits the run fits, one row fewer and the evaluation split comes up short (an overlapping
    split would still find its rows); and the Q/DQ artifact records exactly the calibration and
    tuning rows, as digests of rows of the file."""
    import csv
    import hashlib

    from pipeline.graph import model as graph_model
    from pipeline.parity.policy import seen_rows

    manifest = tiny_release.manifest
    assert set(manifest.data) == {"calibration", "tuning", "evaluation"}
    assert len({r.fingerprint for r in manifest.data.values()}) == 3
    qdq = next(a for a in manifest.artifacts if a.name == "model.int8.qdq")
    assert qdq.options["fallback"]["on"] == "tuning rows vs FP32 graph"
    assert qdq.options["fallback"]["tuning_rows"] == 64

    with tiny_holdout_small.open(encoding="utf-8") as f:
        distinct = list({r["text"]: r for r in csv.DictReader(f) if r["text"].strip()}.values())
    sizes = {"calibration": 48, "tuning": 48, "evaluation": 96}

    def exact(rows: int) -> Path:
        path = tmp_path / f"rows-{rows}.csv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "sentiment"])
            writer.writeheader()
            writer.writerows(distinct[:rows])
        return path

    total = sum(sizes.values())
    fits = invoke("run", recipe_for(tmp_path, tiny, exact(total)), "--out", tmp_path / "fits", "--quiet")
    assert fits.exit_code == 0, fits.output
    short = invoke("run", recipe_for(tmp_path, tiny, exact(total - 1)), "--out", tmp_path / "short")
    assert short.exit_code == 2 and "evaluation (after the calibration and tuning rows) asks for 96 rows" in short.output
    written = json.loads((tmp_path / "fits" / "manifest.json").read_text())
    assert {split: record["rows"] for split, record in written["data"].items()} == sizes
    digests = {hashlib.sha256(json.dumps([r["text"], None], ensure_ascii=False).encode()).hexdigest()[:16]
               for r in distinct[:total]}
    seen = seen_rows(graph_model.load(tmp_path / "fits" / "model.int8.qdq.onnx"))
    assert len(set(seen)) == sizes["calibration"] + sizes["tuning"] and set(seen) <= digests


def test_calibration_without_labels_and_evaluation_with_its_own_column_names(tiny, tiny_holdout_small, tmp_path):
    import csv

    with tiny_holdout_small.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    calibration = tmp_path / "calibration.jsonl"  # unlabeled, as calibration data usually is
    calibration.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:300]))
    evaluation = tmp_path / "evaluation.csv"
    with evaluation.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "gold"])
        writer.writerows([r["text"], r["sentiment"]] for r in rows)
    recipe = recipe_for(tmp_path, tiny, tiny_holdout_small, label_column=None,
                        calibration={"path": str(calibration), "samples": 48},
                        evaluation={"path": str(evaluation), "samples": 96, "text_column": "sentence",
                                    "label_column": "gold"})
    result = invoke("run", recipe, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    fp32 = next(a for a in manifest["artifacts"] if a["name"] == "model.fp32")
    assert fp32["parity"]["metric"] == "accuracy" and fp32["parity"]["reference_metrics"]["accuracy"] > 0.4
    assert manifest["data"]["calibration"]["source"] == str(calibration)


def test_standalone_quantize_then_validate_on_one_file_use_disjoint_rows(tiny, tiny_holdout_small, tmp_path):
    exported = tmp_path / "m.onnx"
    assert invoke("export", "--model", tiny.model, "--out", exported, "--quiet").exit_code == 0
    int8 = tmp_path / "q.onnx"
    result = invoke("quantize", "--model", exported, "--out", int8, "--calibration", tiny_holdout_small,
                     "--tokenizer", tiny.model, "--samples", 100, "--tuning-samples", 50, "--max-length", 32,
                     "--format", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    report = tmp_path / "report.json"
    result = invoke("validate", "--reference", tiny.model, "--artifact", int8, "--data", tiny_holdout_small,
                     "--max-length", 32, "--report", report, "--min-agreement", 0, "--quiet")
    assert result.exit_code == 0, result.output
    parity = json.loads(report.read_text())
    assert parity["details"]["left_out_rows_the_artifact_saw"] == 150
    assert parity["samples"] <= 700 - 150


def test_rerun_reuses_every_stage_and_one_changed_option_reruns_only_its_dependents(tiny, tiny_holdout_small, tmp_path):
    recipe = recipe_for(tmp_path, tiny, tiny_holdout_small)
    cache = tmp_path / "cache"
    first = invoke("run", recipe, "--out", tmp_path / "a", "--cache-dir", cache, "--quiet")
    assert first.exit_code == 0, first.output
    again = invoke("run", recipe, "--out", tmp_path / "b", "--cache-dir", cache, "--quiet")
    assert again.exit_code == 0, again.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert all(s["cached"] for s in manifest["stages"] if not s["stage"].startswith(("trt-check", "build")))
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b") and figures(tmp_path / "a") == figures(tmp_path / "b")
    changed = invoke("run", recipe, "--out", tmp_path / "c", "--cache-dir", cache, "--quiet",
                      "--set", "thresholds.int8.min_agreement=0.6")
    assert changed.exit_code == 0, changed.output
    stages = {s["stage"]: s["cached"] for s in json.loads((tmp_path / "c" / "manifest.json").read_text())["stages"]}
    assert stages["export"] and stages["prune"] and stages["quantize[qdq]"] and stages["validate[model.pruned]"]
    # INT8 made from a pruned graph: the pruned gate judges it against PyTorch (unchanged, reused),
    # the INT8 gate against the pruned graph (changed: judged again).
    assert stages["validate[model.int8.qdq]"] and not stages["validate[model.int8.qdq vs model.pruned]"]


def test_sigkill_then_rerun_gives_the_same_bytes_as_an_uninterrupted_run(tiny, tiny_holdout_small, tmp_path):
    """Also the determinism check: the killed run computes every stage afresh into its own cache
    (the rerun computes what the kill interrupted), and the result equals an uncached run's bytes."""
    recipe = recipe_for(tmp_path, tiny, tiny_holdout_small)
    clean = tmp_path / "clean"
    assert invoke("run", recipe, "--out", clean, "--no-cache", "--quiet").exit_code == 0

    out, cache = tmp_path / "killed", tmp_path / "cache"
    exe = Path(sys.executable).with_name("shipyard")
    proc = subprocess.Popen([str(exe), "run", str(recipe), "--out", str(out), "--cache-dir", str(cache), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # Kill it mid-run: after the export has reached the cache, while later stages are at work.
    while not list((cache / "stages").glob("*/model.onnx")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    time.sleep(0.5)  # mid-prune: the small test model finishes the rest in a few seconds
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".killed.????????.partial"))  # what a kill leaves
    rerun = invoke("run", recipe, "--out", out, "--cache-dir", cache, "--quiet")
    assert rerun.exit_code == 0, rerun.output
    assert not list(tmp_path.glob(".killed.*.partial")) and not list((cache / "stages").glob(".*.partial"))
    assert hashes(out) == hashes(clean) and figures(out) == figures(clean)
    assert invoke("verify", out).exit_code == 0
