"""A standalone command is the run's stage on the same inputs: the same bytes, the same figures,
the same stage cache (issue: one path for every stage)."""

from __future__ import annotations

import json

import pytest
from conftest import invoke, write_recipe

from pipeline.artifacts import sha256_file

pytestmark = pytest.mark.slow



def test_quantize_standalone_and_in_a_run_give_the_same_bytes_and_figures(tiny, tiny_holdout_small, tmp_path):
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, stages={"quantize": {"formats": ["qdq", "cpu"]}},
                          data={"calibration": {"samples": 64}, "evaluation": {"samples": 100}, "tuning_samples": 32,
                                "max_length": 48, "label_column": None},
                          thresholds={"int8": {"min_agreement": 0.5, "max_metric_drop": None}})
    run = invoke("run", recipe, "--out", tmp_path / "release", "--no-cache", "--json")
    assert run.exit_code == 0, run.output
    in_run = {a["name"]: a for a in json.loads(run.output)["manifest"]["artifacts"]}

    exported = tmp_path / "alone" / "model.onnx"
    exported.parent.mkdir()
    assert invoke("export", "--model", tiny.model, "--out", exported, "--no-cache", "--quiet").exit_code == 0
    assert sha256_file(exported) == in_run["model.fp32"]["sha256"]
    for fmt in ("qdq", "cpu"):
        out = tmp_path / "alone" / f"model.int8.{fmt}.onnx"
        result = invoke("quantize", "--model", exported, "--out", out, "--format", fmt, "--calibration",
                        tiny_holdout_small, "--tokenizer", tiny.model, "--samples", 64, "--tuning-samples", 32,
                        "--max-length", 48, "--no-cache", "--json", *(("--form", "fused-per-channel") if fmt == "cpu" else ()))
        assert result.exit_code == 0, result.output
        alone = json.loads(result.output)
        assert alone["sha256"] == in_run[f"model.int8.{fmt}"]["sha256"], fmt
        assert alone["options"] == in_run[f"model.int8.{fmt}"]["options"], fmt


def test_standalone_commands_reuse_the_stage_cache(tiny, tiny_holdout_small, tmp_path):
    cache = tmp_path / "cache"
    args = ("--calibration", tiny_holdout_small, "--tokenizer", tiny.model, "--samples", 48, "--max-length", 32)
    exported = tmp_path / "m.onnx"
    assert invoke("export", "--model", tiny.model, "--out", exported, "--cache-dir", cache, "--quiet").exit_code == 0
    (tmp_path / "a").mkdir()
    first = invoke("prune", "--model", exported, "--out", tmp_path / "a" / "p.onnx", "--ffn", "0.2", *args,
                   "--cache-dir", cache, "--json")
    assert first.exit_code == 0, first.output
    entries = sorted((cache / "stages").iterdir())
    (tmp_path / "b").mkdir()
    again = invoke("prune", "--model", exported, "--out", tmp_path / "b" / "p.onnx", "--ffn", "0.2", *args,
                   "--cache-dir", cache, "--json")
    assert again.exit_code == 0, again.output
    assert sorted((cache / "stages").iterdir()) == entries  # served, not recomputed
    assert json.loads(again.output)["sha256"] == json.loads(first.output)["sha256"]
    for name in ("p.onnx", "p.config.json", "p.plan.json"):  # the stage's files land beside --out
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]  # no work folder left


def test_standalone_export_gates_on_data_rows_as_a_run_does(tiny, tiny_holdout_small, tmp_path):
    """`shipyard export --data` gates on export.validation_samples rows of the file, tokenized as a
    run's evaluation rows; without --data, on the eight probe sentences."""
    out = tmp_path / "m.onnx"
    with_data = invoke("export", "--model", tiny.model, "--out", out, "--data", tiny_holdout_small, "--max-length", 48,
                       "--no-cache", "--json")
    assert with_data.exit_code == 0, with_data.output
    assert json.loads(with_data.output)["rows"] == 64  # the schema's export.validation_samples
    probes = invoke("export", "--model", tiny.model, "--out", out, "--no-cache", "--json", "--overwrite")
    assert json.loads(probes.output)["rows"] == 8
    missing = invoke("export", "--model", tiny.model, "--out", tmp_path / "n.onnx", "--data", tmp_path / "no.csv")
    assert missing.exit_code == 2 and "no.csv not found" in missing.output and not (tmp_path / "n.onnx").exists()


def test_prune_standalone_and_in_a_run_give_the_same_bytes(tiny, tiny_holdout_small, tmp_path):
    """The run's prune stage records the rows it scored on (calibration), as the standalone
    command does; it recorded the tuning rows too, which it never read."""
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, stages={
        "prune": {"enabled": True, "ffn_fraction": 0.25, "heads_per_layer": 1}, "quantize": {"formats": ["cpu"]}},
        data={"calibration": {"samples": 64}, "evaluation": {"samples": 100}, "tuning_samples": 32, "max_length": 48,
              "label_column": None, "padding": "max_length"},
        thresholds={"int8": {"min_agreement": 0.5, "max_metric_drop": None}, "pruned": {"min_agreement": 0.5}})
    run = invoke("run", recipe, "--out", tmp_path / "release", "--no-cache", "--json")
    assert run.exit_code == 0, run.output
    in_run = {a["name"]: a for a in json.loads(run.output)["manifest"]["artifacts"]}

    (tmp_path / "alone").mkdir()
    exported, pruned = tmp_path / "alone" / "model.onnx", tmp_path / "alone" / "model.pruned.onnx"
    assert invoke("export", "--model", tiny.model, "--out", exported, "--no-cache", "--quiet").exit_code == 0
    result = invoke("prune", "--model", exported, "--out", pruned, "--calibration", tiny_holdout_small,
                    "--tokenizer", tiny.model, "--ffn", 0.25, "--heads-per-layer", 1, "--samples", 64,
                    "--max-length", 48, "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    alone = json.loads(result.output)
    assert alone["sha256"] == in_run["model.pruned"]["sha256"]
    assert alone["options"] == in_run["model.pruned"]["options"]
    for name in ("model.pruned.config.json", "model.pruned.plan.json"):
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "release" / name).read_bytes()


def test_validate_standalone_and_in_a_run_give_the_same_figures(tiny, tiny_holdout_small, tmp_path):
    """`shipyard validate` of a release's artifact on the release's evaluation rows gives the run's
    verdict: the same rows, padding, gate and figures."""
    import csv

    with tiny_holdout_small.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    held = {r["text"] for r in rows[:150]}
    evaluation, calibration = tmp_path / "eval.csv", tmp_path / "calibration.csv"
    for path, part in ((evaluation, rows[:150]), (calibration, [r for r in rows[150:] if r["text"] not in held])):
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(part)
    recipe = write_recipe(tmp_path, tiny.model, calibration, stages={"quantize": {"formats": ["qdq"]}},
                          data={"calibration": {"samples": 64}, "max_length": 48, "tuning_samples": 32,
                                "evaluation": {"path": str(evaluation), "samples": len(held)}})
    run = invoke("run", recipe, "--out", tmp_path / "release", "--no-cache", "--json")
    assert run.exit_code == 0, run.output
    in_run = next(a for a in json.loads(run.output)["manifest"]["artifacts"] if a["name"] == "model.int8.qdq")["parity"]

    result = invoke("validate", "--reference", tiny.model, "--artifact", tmp_path / "release" / "model.int8.qdq.onnx",
                    "--data", evaluation, "--label-column", "sentiment", "--max-length", 48, "--min-agreement", 0.95,
                    "--max-metric-drop", 0.03, "--json")
    assert result.exit_code == 0, result.output
    alone = json.loads(result.output)
    assert (alone["samples"], alone["gate"]) == (in_run["samples"], in_run["gate"])
    for key in ("agreement", "max_abs_diff", "mean_abs_diff", "reference_metrics", "artifact_metrics", "metric_drop"):
        assert alone[key] == pytest.approx(in_run[key], abs=1e-6), key


def test_trt_check_of_a_release_target_gives_the_runs_readiness_record(tiny_release):
    """`shipyard trt-check ONNX --recipe R --target T` is the check a run records for T: the same
    TensorRT version, profiles, findings and counts."""
    recipe = tiny_release.out.parent / "recipe.yaml"
    manifest = json.loads((tiny_release.out / "manifest.json").read_text())
    assert manifest["targets"]
    for target in manifest["targets"]:
        result = invoke("trt-check", tiny_release.out / target["onnx"], "--recipe", recipe, "--target",
                        target["name"], "--json")
        assert result.exit_code == 0, result.output
        alone = json.loads(result.output)
        assert {k: v for k, v in alone.items() if k != "path"} == \
            {k: v for k, v in target["readiness"].items() if k != "path"}, target["name"]


def test_validate_goes_through_the_stage_cache(tiny, tiny_holdout_small, tiny_release, tmp_path):
    """A standalone validate is the run's gating: its verdict and PyTorch's outputs are cached
    stages, so the same check again is served from the cache, and a changed gate is a new verdict
    on the cached reference outputs, not a stale one."""
    from pipeline.run.cache import StageCache
    from pipeline.run.standalone import validate_file

    artifact = tiny_release.out / "model.int8.qdq.onnx"

    def check(cache, min_agreement):
        return validate_file(tiny.model, artifact, tiny_holdout_small, "text", None, "sentiment", 60, 48,
                             min_agreement, None, 0.5, None, None, cache=cache)

    cache = StageCache.at(tmp_path / "cache")
    first = check(cache, 0.5)
    assert cache.hits == []
    again = StageCache.at(tmp_path / "cache")
    assert check(again, 0.5) == first
    assert again.hits == ["validate[model.int8.qdq]"]  # the verdict, without running PyTorch or the artifact
    stricter = StageCache.at(tmp_path / "cache")
    strict = check(stricter, 1.0)
    assert stricter.hits == ["pytorch-reference"]
    assert strict["gate"]["min_agreement"] == 1.0 and first["gate"]["min_agreement"] == 0.5
    assert strict["agreement"] == first["agreement"]
    assert strict["passed"] == (first["agreement"] == 1.0)
