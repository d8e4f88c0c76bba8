"""The speed gate (`thresholds.int8.min_speedup`, 1.0 by default): each CPU INT8 artifact is timed
against its float source on this machine; missing the bar fails the run naming the figures, or
with `on_slow: keep_float` removes the artifact, says so, and the float graph is the release's CPU
form. No speed is asserted: 50x is out of reach anywhere, 0.01x within reach anywhere."""

import json

import pytest
from conftest import invoke, write_recipe

pytestmark = pytest.mark.slow


def _run(tiny, rows, tmp_path, name, gate):
    (tmp_path / name).mkdir()
    recipe = write_recipe(tmp_path / name, tiny.model, rows, thresholds={"int8": gate}, targets=[])
    out = tmp_path / name / "release"
    result = invoke("run", recipe, "--out", out, "--cache-dir", tmp_path / "cache")
    manifest = json.loads((out / "manifest.json").read_text())
    return result, out, manifest, next(s for s in manifest["stages"] if s["stage"] == "speed[model.int8.cpu]")


def test_an_int8_cpu_artifact_slower_than_asked_fails_the_run_naming_its_speedup(tiny, tiny_holdout_small, tmp_path):
    result, out, manifest, speed = _run(tiny, tiny_holdout_small, tmp_path, "fail", {"min_speedup": 50})
    assert result.exit_code == 1 and not manifest["passed"]
    assert not speed["passed"] and "min_speedup is 50" in speed["message"] and "as fast as" in speed["message"]
    assert speed["details"]["speedup"][0] < 50 and speed["details"]["threads"] == 2
    assert (out / "model.int8.cpu.onnx").is_file()  # written and recorded, with the failure

    result, out, manifest, speed = _run(tiny, tiny_holdout_small, tmp_path, "keep",
                                        {"min_speedup": 50, "on_slow": "keep_float"})
    assert result.exit_code == 0 and manifest["passed"]
    assert speed["passed"] and speed["details"]["kept_float"] and "removed (on_slow: keep_float)" in speed["message"]
    assert not (out / "model.int8.cpu.onnx").exists()
    assert "model.int8.cpu" not in {a["name"] for a in manifest["artifacts"]}
    assert invoke("verify", out).exit_code == 0
    # The float graph is the CPU form, and what predict runs.
    form = manifest["cpu_form"]
    assert form["artifact"] == "model.fp32" and form["why"].startswith("no CPU INT8 artifact passed")
    assert form["candidates"][0]["artifact"] == "model.int8.cpu" and not form["candidates"][0]["passed"]
    predicted = invoke("predict", out, "--text", "what a day", "--json")
    assert predicted.exit_code == 0 and json.loads(predicted.output)["artifact"] == "model.fp32"

    result, out, manifest, speed = _run(tiny, tiny_holdout_small, tmp_path, "pass", {"min_speedup": 0.01})
    assert result.exit_code == 0 and speed["passed"] and not speed["details"]["kept_float"]
    assert (out / "model.int8.cpu.onnx").is_file()
    assert manifest["cpu_form"]["artifact"] == "model.int8.cpu" and manifest["cpu_form"]["cpu_flags"]


def test_the_speed_gate_is_on_by_default_for_int8_and_off_only_when_a_recipe_says_null():
    from pipeline.recipe.schema import Thresholds

    assert Thresholds().int8.min_speedup == 1.0
    # A recipe that writes its own int8 gate without min_speedup keeps it at 1.0.
    assert Thresholds.model_validate({"int8": {"min_agreement": 0.9}}).int8.min_speedup == 1.0
    assert Thresholds.model_validate({"int8": {"min_speedup": None}}).int8.min_speedup is None
    assert Thresholds().fp32.min_speedup is None


def test_a_speed_gate_on_another_kind_is_refused_naming_where_it_goes():
    from test_faults import assert_clean_failure

    result = invoke("recipe", "validate", "recipes/minilm-tweets.yaml", "--set", "thresholds.fp16.min_speedup=2")
    assert_clean_failure(result, "thresholds.fp16", "set them under thresholds.int8")
