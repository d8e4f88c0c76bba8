"""The whole pipeline on the tiny model: artifacts, manifest, reports and the gate's verdicts."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest

from pipeline.artifacts import sha256_file
from pipeline.release.signing import verify_folder

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_release_folder_has_every_artifact_and_report(tiny_release):
    out = tiny_release.out
    assert tiny_release.passed
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.int8.qdq.onnx", "model.int8.cpu.onnx", "manifest.json",
            "report.md", "junit.xml"} <= names
    assert not [n for n in names if n.endswith(".partial")]


def test_manifest_matches_schema_and_files(tiny_release):
    manifest = json.loads((tiny_release.out / "manifest.json").read_text())
    # The committed schema, which consumers of a release validate against (not one generated now).
    jsonschema.validate(manifest, json.loads((ROOT / "recipes" / "manifest.schema.json").read_text()))
    assert verify_folder(tiny_release.out) == []
    for art in manifest["artifacts"]:
        assert sha256_file(tiny_release.out / art["path"]) == art["sha256"]
        assert art["parity"]["samples"] == 400
    assert manifest["data"]["calibration"]["rows"] == 128
    assert len(manifest["data"]["evaluation"]["fingerprint"]) == 64
    assert manifest["tools"]["onnxruntime"] != "not installed"
    assert manifest["recipe"]["thresholds"]["int8"]["min_agreement"] == 0.95  # as the recipe says
    assert manifest["recipe"]["thresholds"]["fp32"]["max_abs_diff"] == 1e-3  # default filled in


def test_int8_artifacts_pass_their_gate(tiny_release, tiny):
    by_name = {a.name: a for a in tiny_release.manifest.artifacts}
    for name in ("model.int8.qdq", "model.int8.cpu"):
        parity = by_name[name].parity
        # Judged by the recipe's INT8 gate, not the default one (0.98, 0.01), and the verdict is
        # what the figures give under it.
        assert parity["gate"] == {"min_agreement": 0.95, "min_agreement_lower": None, "max_abs_diff": None, "max_metric_drop": 0.03}, parity
        assert by_name[name].passed == parity["passed"] == (
            parity["agreement"] >= 0.95 and parity["metric_drop"] <= 0.03) is True, parity
        trials = by_name[name].options["fallback"]["trials"]
        assert trials and trials[0]["excluded"] == 0
    fp32 = by_name["model.fp32"].parity
    assert fp32["agreement"] == 1.0 and fp32["max_abs_diff"] <= 1e-3
    for artifact in tiny_release.manifest.artifacts:  # each agreement's 95% interval, and the paired test
        low, high = artifact.parity["agreement_interval"]
        assert low <= artifact.parity["agreement"] <= high and high - low < 0.06
        assert 0 <= artifact.parity["mcnemar"]["p_value"] <= 1
    report = (tiny_release.out / "report.md").read_text()
    low, high = fp32["agreement_interval"]
    assert f"1.0000 [{low:.3f}, {high:.3f}]" in report and "(p 1)" in report
    qdq = by_name["model.int8.qdq"].parity
    assert abs(qdq["agreement"] - independent_agreement(tiny_release, tiny.model, "model.int8.qdq.onnx")) < 1e-9


def independent_agreement(release, model_dir: Path, artifact: str) -> float:
    """The share of evaluation rows where the artifact's class is PyTorch's, counted without the
    gate's code: transformers and onnxruntime called directly, each row padded as the gate pads it
    (static Q/DQ: a row's outputs do not depend on its batch)."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from calibration.encode import load_tokenizer
    from pipeline.inputs import data as datamod
    from pipeline.inputs.model import inspect_model
    from pipeline.recipe import Recipe

    recipe = Recipe.model_validate(release.manifest.recipe)
    rows = datamod.prepare(recipe.data, load_tokenizer(model_dir, "text"), inspect_model(model_dir, None).label2id,
                           "text-classification").evaluation.rows
    encoded = AutoTokenizer.from_pretrained(str(model_dir))([r["text"] for r in rows], padding="max_length",
                                                            truncation=True, max_length=recipe.data.max_length,
                                                            return_tensors="np")
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in encoded.items()}).logits.numpy().argmax(1)
    session = ort.InferenceSession(str(release.out / artifact), providers=["CPUExecutionProvider"])
    feed = {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()}
    got = session.run(["logits"], feed)[0].argmax(1)
    return float((got == expected).mean())


def test_qdq_artifact_is_tensorrt_shaped(tiny_release):
    """Explicit Q/DQ with zero points 0, per-channel weights (axis 1) on every MatMul weight."""
    from onnx import numpy_helper

    model = onnx.load(str(tiny_release.out / "model.int8.qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    quant = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dequant = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert quant and dequant
    for node in quant + dequant:
        zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
        assert zero_point is None or not zero_point.any(), node.name
    consumers = {i: n for n in model.graph.node for i in n.input}
    weights = [n for n in dequant if n.input[0] in inits and inits[n.input[0]].ndim == 2]
    assert weights
    for node in weights:
        assert inits[node.input[0]].dtype == np.int8, node.name
        consumer = consumers[node.output[0]]
        trans_b = any(a.name == "transB" and a.i for a in consumer.attribute)
        out_axis = 0 if consumer.op_type == "Gemm" and trans_b else 1  # the output channels
        scale = inits[node.input[1]]
        assert scale.shape == (inits[node.input[0]].shape[out_axis],), f"{node.name}: per output channel"
        assert next((a.i for a in node.attribute if a.name == "axis"), 1) == out_axis
    assert all(inits[n.input[0]].dtype == np.int8 for n in dequant if n.input[0] in inits), "no INT32 biases"
    float_nodes = set(next(a for a in tiny_release.manifest.artifacts if a.name == "model.int8.qdq")
                      .options["float_nodes"])
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            from_dq = [producers.get(i) == "DequantizeLinear" for i in node.input]
            assert all(from_dq) if node.name not in float_nodes else not any(from_dq), node.name


def test_cpu_artifact_is_fused_and_int8(tiny_release):
    model = onnx.load(str(tiny_release.out / "model.int8.cpu.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"Attention", "QAttention"} and "SkipLayerNormalization" in ops
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention"}


def test_reports_state_the_verdict(tiny_release):
    report = (tiny_release.out / "report.md").read_text()
    assert "**Verdict: PASSED**" in report and "model.int8.qdq.onnx" in report
    suite = ET.parse(tiny_release.out / "junit.xml").getroot()
    assert suite.get("failures") == "0"
    assert {c.get("name") for c in suite} >= {"export", "validate[model.int8.qdq]"}


def test_target_records_name_files_inside_the_release(tiny_release):
    """A target's readiness record names its ONNX as the release does (it named the run's temporary
    .partial folder, which never exists afterwards)."""
    for target in tiny_release.manifest.targets:
        assert target.readiness["path"] == target.onnx
        assert (tiny_release.out / target.readiness["path"]).is_file()
