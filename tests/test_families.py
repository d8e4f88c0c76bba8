"""Every family Shipyard lists goes through export, prune (where allowed), both INT8 forms,
trt-check and validate from the CLI, on small random-weight models the tests make themselves."""

import json

import numpy as np
import pytest
from conftest import invoke
from zoo import FAMILIES, make_model, reference_pruned_export

from pipeline.artifacts import sha256_file
from pipeline.parity.runners import OrtRunner
from pipeline.stages.export import export_onnx

pytestmark = pytest.mark.slow
PRUNABLE = [f for f in FAMILIES if f != "albert"]
HEADS = {0: [1], 1: [0, 2]}



@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """family -> (model folder, its ONNX export), made once for the module, whatever runs first."""
    root = tmp_path_factory.mktemp("families")
    made = {}
    for family in FAMILIES:
        folder = make_model(root / family, family)
        export_onnx(folder, root / f"{family}.onnx", 17)
        made[family] = (folder, root / f"{family}.onnx")
    return made


def _token_batches(folder):
    from calibration.encode import Encoder, load_tokenizer
    from calibration.sampling import Columns

    encoder = Encoder(load_tokenizer(folder), Columns(), 48, "longest")
    rows = [{"text": t} for t in ("hello there", "a rather longer sentence about trains and snow", "ok")]
    return [encoder.encode(rows), encoder.encode(rows[1:2] * 5)]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_quantizes_checks_and_validates(family, family_models, tiny_holdout_small, tmp_path):
    folder, exported = family_models[family]
    alone = tmp_path / "model.onnx"
    result = invoke("export", "--model", folder, "--out", alone, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["max_abs_diff"] <= 1e-4
    assert sha256_file(alone) == sha256_file(exported)  # the CLI's export is the stage's

    result = invoke("validate", "--reference", folder, "--artifact", exported, "--data", tiny_holdout_small,
                    "--samples", "96", "--max-length", "48", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["agreement"] == 1.0

    for fmt in ("qdq", "cpu"):
        out = tmp_path / f"int8.{fmt}.onnx"
        result = invoke("quantize", "--model", exported, "--out", out, "--format", fmt, "--calibration",
                        tiny_holdout_small, "--tokenizer", folder, "--samples", "64", "--max-length", "48",
                        "--tuning-samples", "0", "--quiet")  # every node quantized: the fallback is not the subject
        assert result.exit_code == 0, result.output
        result = invoke("validate", "--reference", folder, "--artifact", out, "--data", tiny_holdout_small,
                        "--samples", "96", "--max-length", "48", "--min-agreement", "0.8", "--json")
        assert result.exit_code == 0, result.output
    result = invoke("trt-check", tmp_path / "int8.qdq.onnx")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("family", PRUNABLE)
def test_head_pruning_matches_pytorch_prune_heads_for_each_family(family, family_models, tmp_path):
    folder, exported = family_models[family]
    reference = reference_pruned_export(folder, tmp_path, HEADS)

    ours = tmp_path / "ours.onnx"
    result = invoke("prune", "--model", exported, "--out", ours, "--tokenizer", folder, "--quiet",
                    "--prune-heads", json.dumps({str(k): v for k, v in HEADS.items()}))
    assert result.exit_code == 0, result.output
    for batch in _token_batches(folder):
        expected = OrtRunner(reference).infer(batch)["logits"]
        got = OrtRunner(ours).infer(batch)["logits"]
        assert np.abs(expected - got).max() <= 1e-4


def test_albert_is_refused_for_pruning_with_its_reason(family_models, tmp_path):
    folder, exported = family_models["albert"]
    out = tmp_path / "p.onnx"
    result = invoke("prune", "--model", exported, "--out", out, "--tokenizer", folder, "--prune-heads", '{"1": [0]}')
    assert result.exit_code == 2, result.output
    assert "ALBERT shares one set of layer weights" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("family", PRUNABLE)
def test_pruning_plan_applies_to_each_familys_pytorch_model(family, family_models, tiny_holdout_small, tmp_path):
    """FFN neurons, heads, compensation and 2:4 masks recorded by the prune stage make the family's
    PyTorch model the same function as its pruned graph (what recovery trains from)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline.stages.prune.plan import PruningPlan, apply_to_torch, plan_path

    folder, exported = family_models[family]
    ours = tmp_path / "ours.onnx"
    result = invoke("prune", "--model", exported, "--out", ours, "--calibration", tiny_holdout_small,
                    "--tokenizer", folder, "--ffn", "0.5", "--sparsity-24", "ffn", "--samples", "32",
                    "--max-length", "48", "--quiet", "--prune-heads", json.dumps({str(k): v for k, v in HEADS.items()}))
    assert result.exit_code == 0, result.output
    model = apply_to_torch(AutoModelForSequenceClassification.from_pretrained(str(folder)).eval(),
                           PruningPlan.load(plan_path(ours)))
    for batch in _token_batches(folder):
        with torch.inference_mode():
            accepts = set(model.forward.__code__.co_varnames)
            got = model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in accepts}).logits.numpy()
        assert np.abs(OrtRunner(ours).infer(batch)["logits"] - got).max() <= 1e-4


@pytest.mark.parametrize("family", PRUNABLE)
def test_each_family_prunes_recovers_and_reloads_with_transformers(family, family_models, tiny_holdout_small,
                                                                     tmp_path):
    """Heads and FFN neurons pruned, then recovered: the recovered folder loads with
    `from_pretrained` (its config names the pruned sizes under the family's own keys, which
    DistilBERT calls n_heads and hidden_dim) and is the pruned graph's function (a learning rate
    too small to move it, so the two must agree)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    folder, exported = family_models[family]
    pruned, recovered = tmp_path / "pruned.onnx", tmp_path / "new" / "recovered.onnx"
    result = invoke("prune", "--model", exported, "--out", pruned, "--calibration", tiny_holdout_small,
                    "--tokenizer", folder, "--ffn", "0.25", "--samples", "32", "--max-length", "48", "--quiet",
                    "--prune-heads", json.dumps({str(k): v for k, v in HEADS.items()}))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "pruned.config.json").read_text())
    assert config["shipyard_pruning"]["num_attention_heads_per_layer"] == [4 - len(HEADS[0]), 4 - len(HEADS[1])]
    assert config["shipyard_pruning"]["intermediate_sizes"] == [96, 96]
    result = invoke("recover", "--reference", folder, "--pruned", pruned, "--data", tiny_holdout_small,
                    "--label-column", "sentiment", "--samples", "64", "--tuning-samples", "16", "--max-steps", "2",
                    "--learning-rate", "1e-12", "--max-length", "48", "--out", recovered, "--no-cache", "--quiet")
    assert result.exit_code == 0, result.output
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "new" / "recovered.model")).eval()
    ffn = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
           and name.endswith(("intermediate.dense", "ffn.lin1"))]
    assert [m.out_features for m in ffn] == [96, 96]
    for batch in _token_batches(folder):
        with torch.inference_mode():
            accepts = set(model.forward.__code__.co_varnames)
            got = model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in accepts}).logits.numpy()
        assert np.abs(OrtRunner(pruned).infer(batch)["logits"] - got).max() <= 1e-4


def test_the_family_table_names_each_config_class_s_own_keys():
    """`pipeline.families` against transformers: each size is stored under the key the family's
    config class reads (its `attribute_map`, and for the FFN width an attribute of its own)."""
    from transformers import CONFIG_MAPPING

    from pipeline.families import FAMILIES as TABLE
    from pipeline.families import SIZE_NAMES

    assert set(TABLE) == set(FAMILIES)  # the families the tests make are the ones the table knows
    for model_type, family in TABLE.items():
        config_class = CONFIG_MAPPING[model_type]
        stored = config_class().to_dict()
        for name in SIZE_NAMES:
            key = family.key(name)
            assert key in stored, (model_type, name, key)
            assert config_class.attribute_map.get(name, key) == key, (model_type, name, config_class.attribute_map)
