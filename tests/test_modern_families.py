"""DeBERTa-v3, ModernBERT and MPNet classifiers fine-tuned on real text go through every stage of
a recipe and pass the default gates (issue #30, point 4).

No pretrained model of these families installs offline, so each is trained here as `shipyard demo
prepare --family F --hidden W` trains it: two layers 96 wide from MiniLM's projected word
embeddings, on 2,000 of the demo's tweets (about 10 s each; 63-65% accuracy on three classes,
where a random-weight model would say nothing about INT8's accuracy). Exactness of every stage
on random-weight models of each family is in tests/test_families.py.
"""

import json

import numpy as np
import pytest
from conftest import PROFILE, invoke
from test_faults import assert_clean_failure
from test_tasks import COLUMNS, task_data  # noqa: F401, F811 (fixture)
from zoo import make_model, reference_pruned_export

from pipeline.families import FAMILIES as TABLE
from pipeline.parity.runners import OrtRunner
from pipeline.run.demo import prepare_demo

NEW_FAMILIES = ("deberta-v2", "modernbert", "mpnet")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_a_fine_tuned_model_of_each_new_family_passes_the_default_gates(family, tmp_path):
    paths = prepare_demo(tmp_path / "demo", layers=2, hidden=96, train_rows=2000, learning_rate=3e-3, family=family)
    assert paths.model.name == f"{family}-tweets"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({  # the schema's default gates: nothing is loosened for these families
        "name": f"{family}-tweets", "model": {"path": str(paths.model)},
        "data": {"calibration": {"path": str(paths.holdout), "samples": 256},
                 "evaluation": {"path": str(paths.holdout), "samples": 600},
                 "text_column": "text", "label_column": "sentiment", "max_length": 64},
        "targets": [{"name": "a100-int8", "arch": "sm_80", "precision": "int8", "profiles": [PROFILE]},
                    {"name": "orin-fp16", "arch": "sm_87", "precision": "fp16", "profiles": [PROFILE]}]}))
    out = tmp_path / "release"
    # Parity gates as the schema sets them; the speed gate off: INT8 kernels do not pay on a model
    # 96 wide (tests/test_speed_gate.py covers it).
    result = invoke("run", recipe, "--out", out, "--quiet", "--set",
                    "thresholds.int8={min_agreement: 0.98, max_metric_drop: 0.01, min_speedup: null}")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    parity = {a["name"]: a["parity"] for a in manifest["artifacts"]}
    assert set(parity) == {"model.fp32", "model.int8.qdq", "model.int8.cpu", "model.trt.int8-fp16", "model.trt.fp16"}
    assert parity["model.fp32"]["agreement"] == 1.0
    assert parity["model.fp32"]["reference_metrics"]["accuracy"] > 0.55  # it learned the task
    for name in ("model.int8.qdq", "model.int8.cpu", "model.trt.int8-fp16"):
        assert parity[name]["gate"]["min_agreement"] == 0.98 and parity[name]["passed"], (name, parity[name])
    assert all(t["readiness"]["ready"] for t in manifest["targets"]), manifest["targets"]


TASK_CASES = [(family, task) for family in NEW_FAMILIES for task in TABLE[family].tasks]


@pytest.mark.parametrize(("family", "task"), TASK_CASES)
def test_every_task_of_each_new_family_exports_quantizes_checks_and_validates(family, task, task_data, tmp_path):  # noqa: F811
    """Every task Optimum exports for the family, on a small random-weight model of it: the export is
    exact, both INT8 forms are written and gated, and the Q/DQ graph is TensorRT-ready."""
    model = make_model(tmp_path / "model", family, task, head_scale=5.0)
    data = task_data[task] if task != "text-classification" else None
    columns = COLUMNS.get(task, ["--text-column", "text"])
    exported = tmp_path / "model.onnx"
    result = invoke("export", "--model", model, "--out", exported, "--json")  # the task is read from the head
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["task"] == task and json.loads(result.output)["max_abs_diff"] <= 1e-4
    data = data or task_data["feature-extraction"]
    result = invoke("validate", "--reference", model, "--artifact", exported, "--data", data, "--samples", "64",
                    "--max-length", "48", "--json", *columns)
    assert result.exit_code == 0 and json.loads(result.output)["agreement"] == 1.0, result.output
    calibration = columns[:4] if task == "question-answering" else columns[:2]
    for fmt in ("qdq", "cpu"):
        out = tmp_path / f"int8.{fmt}.onnx"
        result = invoke("quantize", "--model", exported, "--out", out, "--format", fmt, "--calibration", data,
                        "--tokenizer", model, "--samples", "32", "--max-length", "48", "--tuning-samples", "0",
                        "--quiet", *calibration)
        assert result.exit_code == 0, result.output
        result = invoke("validate", "--reference", model, "--artifact", out, "--data", data, "--samples", "64",
                        "--max-length", "48", "--min-agreement", "0", "--json", *columns)
        assert result.exit_code == 0, result.output
    assert invoke("trt-check", tmp_path / "int8.qdq.onnx").exit_code == 0


def test_a_graph_with_the_standard_onnx_attention_op(tiny, tiny_holdout_small, tmp_path):
    """torch.onnx's dynamo exporter at opset 23 writes the standard `Attention` op: TensorRT 10.15
    parses it (10.3 does not, and trt-check says so), both INT8 forms quantize around it (ONNX
    Runtime's dynamic quantizer would take it for its packed contrib op and break it) and gate
    against PyTorch, and its heads prune to what PyTorch's `prune_heads` gives; an Attention node
    whose heads are attributes (3-D Q, K and V, a form Shipyard does not slice) is refused in one
    line."""
    import onnx
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny.model), attn_implementation="sdpa").eval()
    encoded = AutoTokenizer.from_pretrained(str(tiny.model))(["a first tweet", "ok"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    exported = tmp_path / "dynamo.onnx"
    torch.onnx.export(model, tuple(encoded[n] for n in names), str(exported), dynamo=True, opset_version=23,
                      input_names=names, output_names=["logits"], dynamic_shapes=(axes, axes, axes),
                      external_data=False)
    assert [n.op_type for n in onnx.load(str(exported)).graph.node].count("Attention") == 2  # test moot otherwise

    assert invoke("trt-check", exported, "--trt-version", "10.15").exit_code == 0
    refused = invoke("trt-check", exported, "--trt-version", "10.3")
    assert refused.exit_code == 1 and "Attention is not supported by TensorRT 10.3" in refused.output
    rows = ("--calibration", tiny_holdout_small, "--tokenizer", tiny.model, "--samples", "64", "--max-length", "48")
    for fmt in ("qdq", "cpu"):
        out = tmp_path / f"dynamo.{fmt}.onnx"
        result = invoke("quantize", "--model", exported, "--out", out, "--format", fmt, *rows, "--tuning-samples", "0",
                        "--quiet")
        assert result.exit_code == 0, result.output
        result = invoke("validate", "--reference", tiny.model, "--artifact", out, "--data", tiny_holdout_small,
                        "--label-column", "sentiment", "--samples", "200", "--max-length", "48",
                        "--max-metric-drop", "0.05", "--min-agreement", "0.9", "--json")
        assert result.exit_code == 0, result.output
    out = tmp_path / "pruned.onnx"
    result = invoke("prune", "--model", exported, "--out", out, "--tokenizer", tiny.model, "--prune-heads", '{"0": [1]}',
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("Attention") == 2
    reference = reference_pruned_export(tiny.model, tmp_path / "reference", {0: [1]})
    for texts in (["a first tweet", "ok"], ["one much longer tweet about the snow on the trains today"] * 3):
        batch = {k: v.numpy() for k, v in AutoTokenizer.from_pretrained(str(tiny.model))(
            texts, padding=True, return_tensors="pt").items()}
        assert np.abs(OrtRunner(out).infer(batch)["logits"] - OrtRunner(reference).infer(batch)["logits"]).max() <= 1e-4

    graph = onnx.load(str(exported))  # heads as attributes: the 3-D form of the op
    next(n for n in graph.graph.node if n.op_type == "Attention").attribute.append(onnx.helper.make_attribute("q_num_heads", 12))
    onnx.save(graph, str(tmp_path / "attributes.onnx"))
    out = tmp_path / "refused.onnx"
    result = invoke("prune", "--model", tmp_path / "attributes.onnx", "--out", out, "--tokenizer", tiny.model,
                    "--prune-heads", '{"0": [1]}')
    assert_clean_failure(result, "standard ONNX Attention nodes take Q, K and V in a form", "shipyard export", out=out)


def test_the_token_cap_is_each_model_s_positions_not_bert_s(tiny, tiny_holdout_small, tmp_path):
    """Rows and engine profiles may be as long as the model's own positions (ModernBERT's rotary
    positions go to 8,192): 1,000 tokens pass for a ModernBERT that has them and are refused, naming
    the model's 512 positions, for a BERT, in --max-length and in a target's profile alike."""
    from conftest import write_recipe

    folder = make_model(tmp_path / "modernbert", "modernbert", head_scale=5.0)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1024  # rotary: no position weights to resize
    (folder / "config.json").write_text(json.dumps(config))
    long = tmp_path / "long.csv"
    long.write_text("text\n" + "".join(" ".join(f"word{i}" for i in range(n)) + "\n" for n in (900, 1500, 3)))
    exported = tmp_path / "model.onnx"
    assert invoke("export", "--model", folder, "--out", exported, "--quiet").exit_code == 0
    result = invoke("validate", "--reference", folder, "--artifact", exported, "--data", long, "--max-length", "1000",
                    "--json")
    assert result.exit_code == 0 and json.loads(result.output)["agreement"] == 1.0, result.output
    result = invoke("validate", "--reference", tiny.model, "--artifact", exported, "--data", long, "--max-length",
                    "1000")
    assert_clean_failure(result, "--max-length 1000 is longer than model", "512 positions")
    profile = {"batch": {"min": 1, "opt": 1, "max": 4}, "sequence": {"min": 8, "opt": 64, "max": 1000}}
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small,
                          targets=[{"name": "long", "arch": "sm_80", "precision": "fp16", "profiles": [profile]}])
    assert_clean_failure(invoke("run", recipe, "--out", tmp_path / "release"),
                         "targets.long.profiles[0].sequence.max 1000 is longer than model", out=tmp_path / "release")
