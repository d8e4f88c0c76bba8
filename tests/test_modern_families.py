"""DeBERTa-v3, ModernBERT and MPNet classifiers fine-tuned on real text go through every stage of
a recipe and pass the default gates (issue #30, point 4).

No pretrained model of these families installs offline, so each is trained here as `shipyard demo
prepare --family F --hidden W` trains it: two layers 96 wide from MiniLM's projected word
embeddings, on 2,000 of the demo's tweets (about 10 s each; 63-65% accuracy on three classes,
where a random-weight model would say nothing about INT8's accuracy). Exactness of every stage
on random-weight models of each family is in tests/test_families.py.
"""

import json

import pytest
from conftest import PROFILE, invoke

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
    result = invoke("run", recipe, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    parity = {a["name"]: a["parity"] for a in manifest["artifacts"]}
    assert set(parity) == {"model.fp32", "model.int8.qdq", "model.int8.cpu", "model.trt.int8-fp16", "model.trt.fp16"}
    assert parity["model.fp32"]["agreement"] == 1.0
    assert parity["model.fp32"]["reference_metrics"]["accuracy"] > 0.55  # it learned the task
    for name in ("model.int8.qdq", "model.int8.cpu", "model.trt.int8-fp16"):
        assert parity[name]["gate"]["min_agreement"] == 0.98 and parity[name]["passed"], (name, parity[name])
    assert all(t["readiness"]["ready"] for t in manifest["targets"]), manifest["targets"]
