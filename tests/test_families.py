"""Every family Shipyard lists goes through export, prune (where allowed), both INT8 forms,
trt-check and validate from the CLI, on small random-weight models the tests make themselves."""

import json

import numpy as np
import pytest
from conftest import invoke
from zoo import FAMILIES, make_model, reference_pruned_export

from pipeline.artifacts import sha256_file
from pipeline.families import FAMILIES as TABLE
from pipeline.parity.runners import OrtRunner
from pipeline.stages.export import export_onnx

pytestmark = pytest.mark.slow
HEAD_PRUNABLE = [f for f in FAMILIES if "heads" in TABLE[f].pruning]
PRUNABLE = [f for f in HEAD_PRUNABLE if TABLE[f].torch_heads == "prune_heads"]  # transformers' prune_heads is the oracle
FFN_PRUNABLE = [f for f in FAMILIES if "ffn" in TABLE[f].pruning]
REFUSED = [(f, unit) for f in FAMILIES for unit in ("heads", "ffn") if unit not in TABLE[f].pruning]
HEADS = {0: [1], 1: [0, 2]}



@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """family -> (model folder, its ONNX export), made once for the module, whatever runs first."""
    root = tmp_path_factory.mktemp("families")
    made = {}
    for family in FAMILIES:
        folder = make_model(root / family, family)
        export_onnx(folder, root / f"{family}.onnx", 17, "text-classification")
        made[family] = (folder, root / f"{family}.onnx")
    return made


def _token_batches(folder):
    from calibration.encode import Encoder, load_tokenizer
    from calibration.sampling import Columns

    encoder = Encoder(load_tokenizer(folder, "text"), Columns(), 48, "longest", "text")
    rows = [{"text": t} for t in ("hello there", "a rather longer sentence about trains and snow", "ok")]
    return [encoder.encode(rows), encoder.encode(rows[1:2] * 5)]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_quantizes_checks_and_validates(family, family_models, tiny_holdout_small, tmp_path):
    folder, exported = family_models[family]
    if family == "deberta-v2":  # its tokenizer as DeBERTa-v3 checkpoints ship it
        assert (folder / "spm.model").is_file() and not (folder / "tokenizer.json").exists()
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


@pytest.mark.parametrize(("family", "unit"), REFUSED)
def test_units_a_family_cannot_lose_exactly_are_refused_with_the_reason(family, unit, family_models, tiny_holdout_small,
                                                                       tmp_path):
    folder, exported = family_models[family]
    out = tmp_path / "p.onnx"
    request = ("--prune-heads", '{"1": [0]}') if unit == "heads" else ("--ffn", "0.25")
    result = invoke("prune", "--model", exported, "--out", out, "--tokenizer", folder, "--calibration",
                    tiny_holdout_small, "--samples", "16", "--max-length", "32", *request)
    assert result.exit_code == 2, result.output
    assert TABLE[family].not_prunable in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".p.onnx*"))


def _module(layer, path):
    for name in path.split("."):
        layer = getattr(layer, name)
    return layer


@pytest.mark.parametrize("family", FFN_PRUNABLE)
def test_pruning_matches_the_model_with_those_units_zeroed(family, family_models, tiny_holdout_small, tmp_path):
    """The oracle independent of the graph surgery, for families without `prune_heads` too: the
    unpruned PyTorch model with the removed neurons' columns of the down projection and the
    removed heads' columns of the output projection zeroed is the pruned graph's function (on
    two batch and sequence shapes). Heads go where the family allows them: through ModernBERT's
    fused Wqkv, MPNet's shared per-head position bias and DeBERTa's query and key projections of the
    relative positions."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline.stages.prune.plan import PruningPlan, plan_path

    folder, exported = family_models[family]
    ours = tmp_path / "ours.onnx"
    heads = HEADS if "heads" in TABLE[family].pruning else {}
    result = invoke("prune", "--model", exported, "--out", ours, "--calibration", tiny_holdout_small, "--tokenizer",
                    folder, "--ffn", "0.5", "--no-compensate", "--samples", "32", "--max-length", "48", "--quiet",
                    *(("--prune-heads", json.dumps({str(k): v for k, v in heads.items()})) if heads else ()))
    assert result.exit_code == 0, result.output
    plan = PruningPlan.load(plan_path(ours))
    assert {p.layer: p.heads_removed for p in plan.layers if p.heads_removed} == heads
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    layers = _module(getattr(model, model.base_model_prefix), TABLE[family].layers)
    head_dim = 64 // 4
    with torch.no_grad():
        for layer_plan in plan.layers:
            removed = sorted(set(range(layer_plan.ffn_size)) - set(layer_plan.ffn_keep))
            assert removed, "the plan removed nothing: test moot"
            _module(layers[layer_plan.layer], TABLE[family].modules["ffn.w2"]).weight[:, removed] = 0
            out = _module(layers[layer_plan.layer], TABLE[family].modules["attention.out"])
            for head in layer_plan.heads_removed:
                out.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    for batch in _token_batches(folder):
        with torch.inference_mode():
            accepts = set(model.forward.__code__.co_varnames)
            expected = model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in accepts}).logits.numpy()
        assert np.abs(OrtRunner(ours).infer(batch)["logits"] - expected).max() <= 1e-4
    if heads:  # the heads are gone from the graph, not masked in it
        unpruned, pruned = (sum(a.size for a in _weights(path)) for path in (exported, ours))
        assert pruned < unpruned - 3 * 64 * 16 * 3


def _weights(path):
    import onnx
    from onnx import numpy_helper

    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]


@pytest.mark.parametrize("family", HEAD_PRUNABLE)
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


@pytest.mark.parametrize("family", FFN_PRUNABLE)
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
    heads = HEADS if "heads" in TABLE[family].pruning else {}
    result = invoke("prune", "--model", exported, "--out", pruned, "--calibration", tiny_holdout_small,
                    "--tokenizer", folder, "--ffn", "0.25", "--samples", "32", "--max-length", "48", "--quiet",
                    *(("--prune-heads", json.dumps({str(k): v for k, v in heads.items()})) if heads else ()))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "pruned.config.json").read_text())
    assert config["shipyard_pruning"]["num_attention_heads_per_layer"] == [4 - len(heads.get(0, [])),
                                                                            4 - len(heads.get(1, []))]
    assert config["shipyard_pruning"]["intermediate_sizes"] == [96, 96]
    result = invoke("recover", "--reference", folder, "--pruned", pruned, "--data", tiny_holdout_small,
                    "--label-column", "sentiment", "--samples", "64", "--tuning-samples", "16", "--max-steps", "2",
                    "--learning-rate", "1e-12", "--max-length", "48", "--out", recovered, "--no-cache", "--quiet")
    assert result.exit_code == 0, result.output
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "new" / "recovered.model")).eval()
    ffn = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
           and name.endswith(TABLE[family].modules["ffn.w1"])]
    assert [m.out_features for m in ffn] == [96 * (2 if TABLE[family].gated_ffn else 1)] * 2  # a gated W1: both halves
    if TABLE[family].torch_heads == "masked" and heads:  # kept at zero by every step (Adam moves a zero by ~lr)
        layers = _module(getattr(model, model.base_model_prefix), TABLE[family].layers)
        for layer, removed in heads.items():
            out = _module(layers[layer], TABLE[family].modules["attention.out"]).weight
            assert all(not out[:, h * 16:(h + 1) * 16].any() for h in removed)
    for batch in _token_batches(folder):
        with torch.inference_mode():
            accepts = set(model.forward.__code__.co_varnames)
            got = model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in accepts}).logits.numpy()
        assert np.abs(OrtRunner(pruned).infer(batch)["logits"] - got).max() <= 1e-4


def test_the_family_table_names_each_config_class_s_own_keys():
    """`pipeline.families` against transformers: each size is stored under the key the family's
    config class reads (its `attribute_map`, and for the FFN width an attribute of its own)."""
    from transformers import CONFIG_MAPPING

    from pipeline.families import SIZE_NAMES

    assert set(TABLE) == set(FAMILIES)  # the families the tests make are the ones the table knows
    for model_type, family in TABLE.items():
        config_class = CONFIG_MAPPING[model_type]
        stored = config_class().to_dict()
        for name in SIZE_NAMES:
            key = family.key(name)
            assert key in stored, (model_type, name, key)
            assert config_class.attribute_map.get(name, key) == key, (model_type, name, config_class.attribute_map)


def test_the_family_table_s_tasks_are_optimum_s_and_its_module_paths_exist(family_models):
    """Each entry's tasks are those Optimum's ONNX exporter registers for the family, and its
    layer and projection paths name Linear layers of the family's real PyTorch model."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 (registers the exporters' tasks)
    import torch
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoModelForSequenceClassification

    from pipeline.names import TASKS

    for family, entry in TABLE.items():
        registered = set(TasksManager._SUPPORTED_MODEL_TYPE[family]["onnx"])
        assert set(entry.tasks) == registered & set(TASKS), family
        if not entry.pruning:
            continue  # no plan is ever applied to its PyTorch model
        model = AutoModelForSequenceClassification.from_pretrained(str(family_models[family][0]))
        layers = getattr(model, model.base_model_prefix)
        for name in entry.layers.split("."):
            layers = getattr(layers, name)
        for role, path in entry.modules.items():
            module = layers[0]
            for name in path.split("."):
                module = getattr(module, name)
            assert isinstance(module, torch.nn.Linear), (family, role, path)


def test_a_task_optimum_does_not_export_for_a_family_is_refused_before_any_work(tiny_holdout_small, tmp_path):
    """ModernBERT has no question-answering exporter in Optimum: refused by `recipe validate` and by
    `export`, in one line naming the tasks it has, not as an internal error inside the exporter."""
    from conftest import write_recipe

    folder = make_model(tmp_path / "modernbert-qa", "modernbert", "question-answering")
    out = tmp_path / "m.onnx"
    result = invoke("export", "--model", folder, "--out", out)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "Optimum exports no question-answering for modernbert" in result.output and not out.exists()
    recipe = write_recipe(tmp_path, folder, tiny_holdout_small)
    result = invoke("recipe", "validate", recipe)
    assert result.exit_code == 2 and "Optimum exports no question-answering for modernbert" in result.output


def test_a_sentence_transformers_folder_is_a_sentence_encoder_whatever_its_head(tiny_holdout_small, tmp_path):
    """A sentence-transformers folder (modules.json) whose config.json names `*ForMaskedLM` exports
    as feature extraction, without --task, and is gated on its Pooling module's embeddings."""
    from pipeline.parity.tasks import Pooling

    folder = make_model(tmp_path / "mpnet-st", "mpnet", "feature-extraction")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MPNetForMaskedLM"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                  "pooling_mode_cls_token": True}))
    assert Pooling.of(folder) == Pooling("cls", True)
    out = tmp_path / "st.onnx"
    result = invoke("export", "--model", folder, "--out", out, "--data", tiny_holdout_small, "--samples", "32",
                    "--max-length", "48", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["task"] == "feature-extraction"
    result = invoke("validate", "--reference", folder, "--artifact", out, "--data", tiny_holdout_small, "--samples",
                    "64", "--max-length", "48", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["agreement"] == 1.0 and json.loads(result.output)["task"] == "feature-extraction"
