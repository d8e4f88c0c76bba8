"""Activation smoothing before INT8 (pipeline/stages/quantize/smooth.py): exact in float on the unfused and
the fused graph of every family, narrower activations, and INT8 forms made from the smoothed graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import invoke, without_tensorrt, write_recipe
from zoo import FAMILIES, make_model

from pipeline.graph import model as graph_model
from pipeline.parity.runners import OrtRunner
from pipeline.stages.quantize.smooth import smooth

pytestmark = pytest.mark.slow



def _batches(folder, texts=("hello there", "a rather longer sentence about trains and snow in march", "ok")):
    from calibration.encode import Encoder, load_tokenizer
    from calibration.sampling import Columns

    encoder = Encoder(load_tokenizer(folder, "text"), Columns(), 48, "longest", "text")
    rows = [{"text": t} for t in texts]
    return [encoder.encode(rows), encoder.encode(rows[1:2] * 5), encoder.encode(rows[:1])]


def _outputs(path, batches):
    runner = OrtRunner(path)
    return [runner.infer(b) for b in batches]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "albert"])
def test_smoothing_is_exact_in_float_on_unfused_and_fused_graphs(family, tmp_path):
    from onnxruntime.transformers.optimizer import optimize_model

    folder = make_model(tmp_path / family, family)
    exported = tmp_path / "model.onnx"
    assert invoke("export", "--model", folder, "--out", exported, "--quiet").exit_code == 0
    fused = tmp_path / "fused.onnx"
    optimize_model(str(exported), model_type="bert", num_heads=0, hidden_size=0).save_model_to_file(str(fused))
    calibration = _batches(folder)
    for source in (exported, fused):
        model = graph_model.load(source)
        original = graph_model.to_proto(model).SerializeToString()
        smoothed, report = smooth(model, calibration[:1], alpha=0.5)
        assert graph_model.to_proto(model).SerializeToString() == original  # the input graph is not modified
        assert len(report.smoothed) >= 2 and not report.skipped, report.to_dict()
        assert all(s["activation_max_after"] < s["activation_max_before"] for s in report.smoothed)
        out = tmp_path / f"smoothed-{source.name}"
        graph_model.save(smoothed, out)
        for before, after in zip(_outputs(source, calibration), _outputs(out, calibration), strict=True):  # other shapes too
            for name in before:
                np.testing.assert_allclose(after[name], before[name], atol=1e-4, rtol=1e-4)


def test_smoothed_int8_forms_record_it_and_keep_the_fused_attention(tiny, tiny_holdout_small, tmp_path):
    exported = tmp_path / "model.onnx"
    assert invoke("export", "--model", tiny.model, "--out", exported, "--quiet").exit_code == 0
    for fmt in ("qdq", "cpu"):
        out = tmp_path / f"int8.{fmt}.onnx"
        result = invoke("quantize", "--model", exported, "--out", out, "--format", fmt, "--calibration",
                        tiny_holdout_small, "--tokenizer", tiny.model, "--samples", "64", "--tuning-samples", "0",
                        "--max-length", "64", "--smooth", "--smooth-alpha", "0.5", "--json")
        assert result.exit_code == 0, result.output
        smoothing = json.loads(result.output)["options"]["smoothing"]
        assert smoothing["alpha"] == 0.5 and len(smoothing["smoothed"]) == 4  # 2 layers: QKV and FFN inputs
        ops = [n.op_type for n in onnx.load(str(out)).graph.node]
        if fmt == "cpu":
            assert "Attention" in ops or "QAttention" in ops  # smoothed after fusion: fusion kept
        result = invoke("validate", "--reference", tiny.model, "--artifact", out, "--data", tiny_holdout_small,
                        "--samples", "200", "--max-length", "64", "--min-agreement", "0.9", "--json")
        assert result.exit_code == 0, result.output


def test_smoothing_is_on_for_qdq_and_off_for_cpu_by_default(tiny_release):
    """The defaults bench/smoothing.py measured: the run's Q/DQ artifact is smoothed, its CPU one not."""
    artifacts = {a.name: a for a in tiny_release.manifest.artifacts}
    assert artifacts["model.int8.qdq"].options["smoothing"]["alpha"] == 0.5
    assert "smoothing" not in artifacts["model.int8.cpu"].options
    nodes = onnx.load(str(tiny_release.out / artifacts["model.int8.qdq"].path)).graph.node
    restores = [n for n in nodes if n.op_type == "Mul" and n.name.endswith(".smooth.restore")]
    assert len(restores) == 4  # 2 layers: each residual branch reads its LayerNorm output times s


def _from_initialisation(folder):
    """`folder`'s model with every LayerNorm as initialisation leaves it (weight ones, bias zeros):
    the exporter then keeps one copy of each and forwards it to every layer through Identity."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
    model.save_pretrained(folder)
    return folder


def test_a_graph_with_identity_forwarded_layernorm_weights_goes_through_every_stage(tiny_holdout_small, tmp_path):
    """Seen: `shipyard quantize --format qdq` exited 3 (KeyError on a LayerNorm weight) on a model
    straight from initialisation, because smoothing read only initializers."""
    folder = _from_initialisation(make_model(tmp_path / "init", "bert", head_scale=30.0))
    exported = tmp_path / "model.onnx"
    assert invoke("export", "--model", folder, "--out", exported, "--quiet").exit_code == 0
    identities = [n for n in onnx.load(str(exported)).graph.node if n.op_type == "Identity"]
    assert len(identities) >= 4, "the exporter no longer forwards equal tensors through Identity: test moot"

    qdq = tmp_path / "int8.qdq.onnx"
    result = invoke("quantize", "--model", exported, "--out", qdq, "--format", "qdq", "--calibration",
                    tiny_holdout_small, "--tokenizer", folder, "--samples", "64", "--tuning-samples", "32",
                    "--max-length", "48", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["options"]["smoothing"]["smoothed"]) == 4  # every LayerNorm got its own

    recipe = write_recipe(tmp_path, folder, tiny_holdout_small,
                          stages={"prune": {"enabled": True, "ffn_fraction": 0.25, "heads_per_layer": 1}},
                          targets=[{"name": "orin-fp16", "arch": "sm_87", "precision": "fp16",
                                    "profiles": [{"batch": {"min": 1, "opt": 8, "max": 32},
                                                  "sequence": {"min": 8, "opt": 64, "max": 64}}]}])
    with without_tensorrt():
        result = invoke("run", recipe, "--out", tmp_path / "release", "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    names = {a["name"] for a in json.loads(result.output)["manifest"]["artifacts"]}
    assert names == {"model.fp32", "model.pruned", "model.int8.qdq", "model.int8.cpu", "model.trt.fp16"}
