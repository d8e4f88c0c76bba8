"""The stages on plain paths through the CLI, and the run's exit codes."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import invoke, write_recipe
from onnx import numpy_helper

from pipeline.cli import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny.model), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output)


def test_export_checks_against_pytorch(exported):
    out, payload = exported
    onnx.checker.check_model(str(out))
    assert payload["passed"] and payload["max_abs_diff"] <= 1e-4


def test_export_gate_fails_with_exit_1_beyond_tolerance(tiny, tmp_path):
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny.model), "--out",
                                      str(tmp_path / "m.onnx"), "--atol", "1e-12"])
    assert result.exit_code == 1, result.output
    assert "> atol 1e-12" in result.output


@pytest.mark.parametrize("fmt", ["qdq", "cpu"])
def test_quantize_then_validate_passes(tiny, tiny_holdout_small, exported, tmp_path, fmt):
    out = tmp_path / f"int8.{fmt}.onnx"
    runner = CliRunner()
    result = runner.invoke(cli, ["quantize", "--model", str(exported[0]), "--out", str(out),
                                 "--calibration", str(tiny_holdout_small), "--tokenizer", str(tiny.model),
                                 "--format", fmt, "--samples", "64", "--max-length", "64", "--quiet"])
    assert result.exit_code == 0, result.output
    report = tmp_path / "parity.json"
    # The 2-layer test model's accuracy moves by 0.5 point per row of 200, so its metric gate is the
    # suite's looser one (conftest.write_recipe); the agreement gate is the INT8 default.
    result = runner.invoke(cli, ["validate", "--reference", str(tiny.model), "--artifact", str(out),
                                 "--data", str(tiny_holdout_small), "--label-column", "sentiment",
                                 "--samples", "200", "--max-length", "64", "--max-metric-drop", "0.03",
                                 "--report", str(report)])
    assert result.exit_code == 0, result.output
    parity = json.loads(report.read_text())
    assert parity["passed"] and parity["gate"]["min_agreement"] == 0.98  # the INT8 default picked


@pytest.mark.parametrize("form, float_tables", [("unfused-per-channel", 0), ("unfused-per-channel-float-embeddings", 3)])
def test_a_cpu_form_may_leave_the_embedding_tables_in_float(tiny, tiny_holdout_small, exported, tmp_path, form,
                                                            float_tables):
    out = tmp_path / "int8.cpu.onnx"
    result = CliRunner().invoke(cli, ["quantize", "--model", str(exported[0]), "--out", str(out),
                                      "--calibration", str(tiny_holdout_small), "--tokenizer", str(tiny.model),
                                      "--format", "cpu", "--form", form, "--samples", "64", "--max-length", "64",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    tables = {i.name: i for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    # Word, position and token-type lookups read float tables, or INT8 ones dequantized after the lookup.
    assert sum(tables[n.input[0]].data_type == onnx.TensorProto.FLOAT for n in gathers) == float_tables
    quantized = [n for n in gathers if tables[n.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    assert len(quantized) == 3 - float_tables


def test_entropy_and_percentile_calibration(tiny, tiny_holdout_small, exported, tmp_path):
    """Each method sets its own activation ranges from the same rows: entropy and percentile clip
    outliers MinMax keeps, so their activation scales differ from MinMax's (were every method run
    as MinMax, they would be equal)."""
    scales = {}
    for method in ("minmax", "entropy", "percentile"):
        out = tmp_path / f"{method}.onnx"
        result = CliRunner().invoke(cli, [
            "quantize", "--model", str(exported[0]), "--out", str(out), "--calibration",
            str(tiny_holdout_small), "--tokenizer", str(tiny.model), "--method", method,
            "--samples", "32", "--max-length", "64", "--tuning-samples", "0", "--json"])  # no fallback search
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["options"]["method"] == method
        scales[method] = _activation_scales(out)
    assert scales["minmax"].keys() == scales["entropy"].keys() == scales["percentile"].keys()
    for method in ("entropy", "percentile"):
        differ = [n for n in scales["minmax"] if not np.isclose(scales[method][n], scales["minmax"][n])]
        assert len(differ) >= len(scales["minmax"]) // 2, (method, len(differ), len(scales["minmax"]))


def _activation_scales(path) -> dict[str, float]:
    """Scale of each QuantizeLinear whose input is an activation (not a weight), by that input."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits and inits[n.input[1]].size == 1}


def test_perturbed_weights_fail_the_gate_with_exit_1(tiny, tiny_holdout_small, exported, tmp_path):
    model = onnx.load(str(exported[0]))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.ndim == 2 and weights.dtype == np.float32 and weights.shape[0] < 10000:
            noisy = weights + rng.normal(0, 0.05, weights.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    broken = tmp_path / "perturbed.onnx"
    onnx.save(model, str(broken))
    result = CliRunner().invoke(cli, ["validate", "--reference", str(tiny.model), "--artifact", str(broken),
                                      "--data", str(tiny_holdout_small), "--label-column", "sentiment",
                                      "--samples", "200", "--max-length", "64"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "max |output diff|" in result.output


def test_impossible_int8_threshold_fails_run_with_exit_1_and_keeps_artifacts(tiny, tiny_holdout_small, tmp_path):
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small,
                          stages={"quantize": {"formats": ["cpu"]}})
    out = tmp_path / "release"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--quiet",
                                      "--set", "thresholds.int8.min_agreement=1.0",
                                      "--set", "thresholds.int8.max_abs_diff=0"])
    assert result.exit_code == 1, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passed"] is False
    verdicts = {a["name"]: a["passed"] for a in manifest["artifacts"]}
    assert verdicts == {"model.fp32": True, "model.int8.cpu": False}
    assert (out / "model.int8.cpu.onnx").is_file()
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("failures") == "1"
    assert "**Verdict: FAILED**" in (out / "report.md").read_text()


def test_run_json_output_and_existing_folder(tiny, tiny_holdout_small, tmp_path):
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small,
                          stages={"quantize": {"enabled": False}})
    out = tmp_path / "release"
    runner = CliRunner()
    result = runner.invoke(cli, ["run", str(recipe), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["passed"] and [a["name"] for a in payload["manifest"]["artifacts"]] == ["model.fp32"]
    again = runner.invoke(cli, ["run", str(recipe), "--out", str(out), "--quiet"])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    replaced = runner.invoke(cli, ["run", str(recipe), "--out", str(out), "--quiet", "--overwrite"])
    assert replaced.exit_code == 0


# Standalone options that are recipe settings: (command, option) -> the schema section and field.
SCHEMA_OPTIONS = {
    ("export", "opset"): ("ExportSpec", "opset"), ("export", "atol"): ("ExportSpec", "atol"),
    ("quantize", "method"): ("QuantizeSpec", "method"), ("quantize", "max_length"): ("DataSpec", "max_length"),
    ("quantize", "tuning_samples"): ("DataSpec", "tuning_samples"),
    ("quantize", "smooth_alpha"): ("SmoothingSpec", "alpha"),
    ("prune", "ffn_fraction"): ("PruneSpec", "ffn_fraction"), ("prune", "ffn_scope"): ("PruneSpec", "ffn_scope"),
    ("prune", "ffn_multiple"): ("PruneSpec", "ffn_multiple"),
    ("prune", "heads_per_layer"): ("PruneSpec", "heads_per_layer"),
    ("prune", "sparsity_24"): ("PruneSpec", "sparsity_24"), ("prune", "compensate"): ("PruneSpec", "compensate"),
    ("prune", "max_length"): ("DataSpec", "max_length"),
    **{("recover", name): ("RecoverSpec", name) for name in (
        "epochs", "learning_rate", "batch_size", "temperature", "label_weight", "hidden_weight", "dropout",
        "tuning_samples", "eval_every", "patience", "seed")},
    ("validate", "max_answer_tokens"): ("ModelSpec", "max_answer_tokens"),
    ("validate", "min_cosine"): ("Thresholds", "min_cosine"), ("validate", "max_length"): ("DataSpec", "max_length"),
}


@pytest.mark.parametrize("command, option", sorted(SCHEMA_OPTIONS))
def test_standalone_option_defaults_are_the_recipe_schemas(command, option):
    """`shipyard quantize` and a recipe's quantize stage start from the same values (seen: 128
    tuning rows standalone, 256 in a recipe)."""
    import pipeline.recipe as schema

    section, field = SCHEMA_OPTIONS[(command, option)]
    spec = getattr(schema, section)
    expected = spec.model_fields[field].get_default(call_default_factory=True)
    param = next(p for p in cli.commands[command].params if p.name == option)
    assert param.default == expected


def test_a_metric_the_task_does_not_have_is_refused_alike_by_run_and_validate(tiny, tiny_holdout_small, exported,
                                                                              tmp_path):
    """One policy decides the gated metric (`pipeline.parity.policy.gated_metric`); the standalone
    validate had its own copy, with its own message."""
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, thresholds={"metric": "entity_f1"})
    run = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(tmp_path / "out"), "--no-cache"])
    validate = CliRunner().invoke(cli, ["validate", "--reference", str(tiny.model), "--artifact", str(exported[0]),
                                        "--data", str(tiny_holdout_small), "--label-column", "sentiment",
                                        "--metric", "entity_f1"])
    tail = "'entity_f1' does not apply to text-classification; use one of: accuracy, macro_f1"
    assert (run.exit_code, validate.exit_code) == (2, 2), run.output + validate.output
    assert run.output.strip() == f"error: thresholds.metric {tail}"
    assert validate.output.strip() == f"error: --metric {tail}"
    assert not (tmp_path / "out").exists()


def test_validate_gates_on_the_agreement_intervals_lower_end(tiny, tiny_holdout_small, exported, tmp_path):
    """96 rows that all agree show at best 0.9615 at 95% (Wilson): a lower-bound gate of 0.99
    fails where the point gate passes, and the JSON report gives the interval."""
    args = ("validate", "--reference", tiny.model, "--artifact", exported[0], "--data", tiny_holdout_small,
            "--samples", 96, "--label-column", "sentiment", "--json")
    strict = invoke(*args, "--min-agreement-lower", 0.99)
    assert strict.exit_code == 1, strict.output
    report = json.loads(strict.output)
    assert report["agreement"] == 1.0 and report["agreement_interval"] == [round(96 / (96 + 1.959963984540054**2), 6),
                                                                          1.0]
    assert report["failures"] == ["agreement's 95% lower bound 0.9615 < 0.99 (96 rows)"]
    assert report["mcnemar"] == {"reference_only_correct": 0, "artifact_only_correct": 0, "p_value": 1.0}
    assert invoke(*args, "--min-agreement-lower", 0.95).exit_code == 0
