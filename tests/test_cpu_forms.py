"""CPU artifacts chosen by measurement, and OpenVINO as a runtime of its own (`pipeline.runtimes`).

A run's cpu format tries each of `stages.quantize.cpu_forms`, its openvino format each of
`openvino_forms`; every candidate's figures, the winner and the CPU are recorded, and what ships
is the fastest that meets the agreement target. The OpenVINO IR travels as two files (.xml, .bin),
both hashed, verified and run by OpenVINO under the same gates as every other artifact."""

import json
import math
import shutil
import sys

import pytest
from conftest import invoke, write_recipe
from test_faults import assert_clean_failure

from pipeline.names import CPU_FORMS
from pipeline.parity.runners import FILE_CHECKS, RUNNERS
from pipeline.runtimes import ARTIFACT_FORMATS, RUNTIMES, format_of_path
from pipeline.stages.quantize.stage import CPU_FORM_SHAPES


def test_every_cpu_form_is_one_row_of_the_shape_table():
    assert list(CPU_FORM_SHAPES) == list(CPU_FORMS)


def test_every_artifact_format_has_one_runtime_entry_and_one_runner():
    assert set(RUNTIMES) == set(ARTIFACT_FORMATS) == set(RUNNERS)
    assert set(FILE_CHECKS) <= set(ARTIFACT_FORMATS)
    assert format_of_path("a/model.int8.openvino.xml") == "openvino"
    assert format_of_path("engine.plan") == "tensorrt-engine" and format_of_path("model.onnx") == "onnx"


def test_openvino_asked_without_the_extra_exits_2_naming_the_install_command(tiny, tiny_holdout_small, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # find_spec says: not installed
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, stages={"quantize": {"formats": ["openvino"]}},
                          targets=[])
    assert_clean_failure(invoke("run", recipe, "--out", tmp_path / "r"), "openvino", 'pip install -e ".[openvino]"')
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_run_chooses_each_cpu_format_by_measurement_and_ships_an_openvino_ir(tiny, tiny_holdout_small, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e '.[openvino]')")
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, targets=[], stages={"quantize": {
        "formats": ["cpu", "openvino"], "cpu_forms": list(CPU_FORMS), "openvino_forms": ["nncf", "qdq"],
        "deploy_isa": "amx"}})
    out = tmp_path / "release"
    result = invoke("run", recipe, "--out", out, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    arts = {a["name"]: a for a in manifest["artifacts"]}

    for name, forms in (("model.int8.cpu", len(CPU_FORMS)), ("model.int8.openvino", 2)):
        choice = arts[name]["options"]["choice"]
        rows = choice["candidates"]
        assert len(rows) == forms and all(r["b1_ms"] > 0 and r["batch_per_s"] > 0 for r in rows)
        passing = [r for r in rows if r["agreement"] >= choice["min_agreement"]]
        fastest = max(passing or rows, key=lambda r: math.prod(r["speedup"]) if passing else r["agreement"])
        assert choice["chosen"] == fastest["form"] == arts[name]["options"]["form"]
        assert choice["cpu_flags"] and choice["threads"] == 2
        # amx is named as the deployment CPU: the record says where the timings came from.
        if "amx_int8" not in choice["cpu_flags"]:
            assert "timed here, not there" in choice["timings_from"]

    # NNCF's candidate tried its SmoothQuant alphas, in the recipe's order, before any node in float.
    nncf_row = next(r for r in arts["model.int8.openvino"]["options"]["choice"]["candidates"] if r["form"] == "nncf")
    assert nncf_row["setting"] in [f"SmoothQuant alpha {a:g}" for a in (0.95, 0.9, 0.8, 0.7)]

    ir = arts["model.int8.openvino"]
    assert ir["format"] == "openvino" and ir["path"] == "model.int8.openvino.xml"
    from pipeline.parity.runners import OvRunner

    # What OpenVINO ran the float layers in (bf16 on a CPU with avx512_bf16 or AMX) is recorded.
    here = OvRunner(out / ir["path"]).inference_precision
    assert ir["options"]["float_layers_ran_in"].startswith(f"{here} ") and here in ("bf16", "f32", "f16")
    assert list(ir["external_data"]) == ["model.int8.openvino.bin"] and ir["parity"]["passed"] is not None
    assert {s["stage"] for s in manifest["stages"]} >= {"validate[model.int8.openvino]", "speed[model.int8.openvino]"}
    assert manifest["cpu_form"]["artifact"] in arts
    import torch

    assert manifest["model"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # model.device: auto
    assert {c["artifact"] for c in manifest["cpu_form"]["candidates"]} == {"model.int8.cpu", "model.int8.openvino"}

    # A real tritonserver (Python backend running OpenVINO) serves the IR's predictions as predict gives them.
    from test_triton import assert_served_like_predict

    (tmp_path / "served").mkdir()
    assert_served_like_predict(out, tmp_path / "served", "model.int8.openvino")
    from pipeline.release.triton import parse_config

    assert invoke("package", out, "--triton", tmp_path / "repo").exit_code == 0  # for Triton's openvino backend
    config = parse_config((tmp_path / "repo" / "model_int8_openvino" / "config.pbtxt").read_text())
    assert config.backend == "openvino" and [i.name for i in config.input][:2] == ["input_ids", "attention_mask"]
    assert {p.name for p in (tmp_path / "repo" / "model_int8_openvino" / "1").iterdir()} == {"model.xml", "model.bin"}
    assert invoke("verify", tmp_path / "repo").exit_code == 0

    # The IR runs under predict as the gate ran it, and its weights are verified with it.
    predicted = invoke("predict", out, "--artifact", "model.int8.openvino", "--text", "what a day", "--json")
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.output)["predictions"][0]["label"]
    assert invoke("verify", out).exit_code == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    with (damaged / "model.int8.openvino.bin").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    failed = invoke("verify", damaged)
    assert failed.exit_code != 0 and "model.int8.openvino.bin" in failed.output

    # The stage cache keeps the IR's weights with it: a rerun is served whole.
    again = tmp_path / "again"
    assert invoke("run", recipe, "--out", again, "--cache-dir", tmp_path / "cache").exit_code == 0
    assert (again / "model.int8.openvino.bin").read_bytes() == (out / "model.int8.openvino.bin").read_bytes()


@pytest.mark.slow
def test_standalone_quantize_to_openvino_writes_an_ir_and_refuses_another_suffix(tiny, tiny_holdout_small, tiny_release,
                                                                                tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e '.[openvino]')")
    base = ["quantize", "--model", tiny_release.out / "model.onnx", "--format", "openvino", "--calibration", tiny_holdout_small,
            "--tokenizer", tiny.model, "--text-column", "text"]
    assert_clean_failure(invoke(*base, "--out", tmp_path / "model.onnx"), "writes a .xml file", "model.xml")
    result = invoke(*base, "--out", tmp_path / "ir" / "model.xml", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ir" / "model.xml").is_file() and (tmp_path / "ir" / "model.bin").is_file()
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["model.bin", "model.xml"]
    # The IR carries its record (kind, the rows it saw): validate gates it and leaves those rows out.
    from pipeline.stages.quantize.openvino import read_record

    record = read_record(tmp_path / "ir" / "model.xml")
    assert record["kind"] == "int8" and len(record["seen_rows"].split(",")) > 100
    checked = invoke("validate", "--reference", tiny.model, "--artifact", tmp_path / "ir" / "model.xml", "--data",
                     tiny_holdout_small, "--text-column", "text", "--label-column", "sentiment", "--json")
    assert checked.exit_code in (0, 1), checked.output
    report = json.loads(checked.output)
    assert report["details"]["left_out_rows_the_artifact_saw"] > 100 and report["gate"]["min_agreement"] == 0.98


def _fake_quantizers(agreement: dict[tuple[str, int], float], made: list[tuple[str, int]]):
    """Quantizers that make nothing: each artifact's 'path' names its setting and float nodes, and
    `agreement` says how it agrees; `made` records every quantization in order."""
    from pathlib import Path

    def quantizer(setting: str):
        def quantize(excluded: list[str]) -> Path:
            made.append((setting, len(excluded)))
            return Path(f"{setting}/{len(excluded)}")
        return quantize

    def evaluate(path):
        setting, k = path.parts
        return agreement.get((setting, int(k)), agreement.get((setting, -1), 0.0)), 0.0

    return {name: quantizer(name) for name in dict.fromkeys(s for s, _ in agreement)}, evaluate


def test_a_setting_that_reaches_the_target_is_chosen_before_any_node_is_kept_in_float():
    """NNCF's SmoothQuant alpha costs no speed and a node kept in float does (5% on the demo): the
    fallback tries the settings in order with no node in float, and stops at the first that agrees."""
    from pipeline.stages.quantize.sensitivity import search, settle

    ranking = [(f"n{i}", 1.0 - i / 10) for i in range(8)]
    made: list[tuple[str, int]] = []
    settings, evaluate = _fake_quantizers({("0.95", 0): 0.988, ("0.95", -1): 0.999, ("0.9", 0): 0.996,
                                           ("0.8", 0): 1.0}, made)
    name, path, trials = settle(settings, evaluate, 0.995)
    assert name == "0.9" and made == [("0.95", 0), ("0.9", 0)]  # 0.8 is never tried
    chosen_path, excluded, search_trials, chosen = search(settings[name], evaluate, ranking, 0.995, 8,
                                                          (path, trials[-1]))
    assert excluded == [] and chosen.setting == "0.9" and str(chosen_path) == "0.9/0" and len(made) == 2

    # None reaches it with no node in float: the best-agreeing setting keeps the fewest nodes that do.
    made.clear()
    settings, evaluate = _fake_quantizers({("0.95", 0): 0.97, ("0.9", 0): 0.985, ("0.9", 2): 0.996,
                                           ("0.9", 8): 0.999, ("0.8", 0): 0.985, ("0.8", -1): 0.999}, made)
    name, path, trials = settle(settings, evaluate, 0.995)
    assert name == "0.9" and [t.setting for t in trials] == ["0.95", "0.9", "0.8"]  # the earlier of two equals
    _, excluded, search_trials, chosen = search(settings[name], evaluate, ranking, 0.995, 8,
                                                next((path, t) for t in trials if t.setting == name))
    assert excluded == ["n0", "n1"] and chosen.setting == "0.9" and chosen.agreement == 0.996
    assert all(setting == "0.9" for setting, k in made if k > 0) and ("0.9", 0) not in made[3:]  # k=0 not remade
    assert [t.record()["setting"] for t in search_trials] == ["0.9"] * len(search_trials)


def test_a_candidate_its_runtime_cannot_run_is_recorded_and_left_out(tiny, tiny_holdout_small, tmp_path, monkeypatch):
    """OpenVINO 2026.4 refuses to compile ONNX Runtime's Q/DQ graph of an onnxsim-simplified
    ModernBERT (a scale-size check in its CPU plugin): that candidate is recorded with the reason and
    the others ship; when no candidate runs, the stage exits naming each reason and writes nothing."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e '.[openvino]')")
    from pipeline.parity import runners
    from pipeline.stages.export import export_onnx

    source = tmp_path / "model.onnx"
    export_onnx(tiny.model, source, 17, "text-classification")
    real_infer = runners.OvRunner.infer
    refused: set[str] = {"form-1"}  # the second form, qdq

    def infer(self, batch):
        if any(part in refused for part in self.path.parts):
            raise RuntimeError("Exception from src/plugins/intel_cpu: Check 'any_of(scale.size(), OC, 1U)' failed")
        return real_infer(self, batch)

    monkeypatch.setattr(runners.OvRunner, "infer", infer)
    args = ["quantize", "--model", source, "--format", "openvino", "--calibration", tiny_holdout_small,
            "--tokenizer", tiny.model, "--samples", "64", "--max-length", "64", "--json"]
    out = tmp_path / "int8.openvino.xml"
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["options"]["choice"]["candidates"]
    assert [r["form"] for r in rows] == ["nncf", "qdq"] and "scale.size()" in rows[1]["failed"]
    assert json.loads(result.output)["options"]["form"] == "nncf"

    refused.add("form-0")
    nothing = tmp_path / "none.openvino.xml"
    assert_clean_failure(invoke(*args, "--out", nothing), "no openvino form runs here", "nncf:", "qdq:",
                         out=nothing)
