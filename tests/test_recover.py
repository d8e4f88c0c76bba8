"""`shipyard recover`: distillation from the original PyTorch model into the pruned structure (issue #11).

The plan's exactness (the pruned PyTorch model equals the pruned graph before training) is in
tests/test_prune.py and tests/test_families.py; here: recovery wins agreement back on held-out
rows, the recovered ONNX is gated as a pruned artifact, every task recovers, and bad requests are
refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import invoke, merged, write_recipe
from test_tasks import COLUMNS, TASKS, task_data, task_models  # noqa: F401 (fixtures)

from pipeline.graph import model as graph_model
from pipeline.parity.policy import recorded_kind, seen_rows

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def heavy(tiny, tiny_holdout_small, tmp_path_factory):
    """The tiny model exported and pruned hard: 75% of FFN neurons and 8 of 12 heads per layer."""
    folder = tmp_path_factory.mktemp("recover")
    exported, pruned = folder / "model.onnx", folder / "heavy.onnx"
    assert invoke("export", "--model", tiny.model, "--out", exported, "--quiet").exit_code == 0
    result = invoke("prune", "--model", exported, "--out", pruned, "--calibration", tiny_holdout_small,
                    "--tokenizer", tiny.model, "--ffn", "0.75", "--heads-per-layer", "8", "--samples", "128",
                    "--max-length", "64", "--quiet")
    assert result.exit_code == 0, result.output
    return exported, pruned


def _agreement(tiny, data, artifact) -> dict:
    result = invoke("validate", "--reference", tiny.model, "--artifact", artifact, "--data", data,
                    "--label-column", "sentiment", "--samples", "300", "--max-length", "64", "--min-agreement", "0",
                    "--max-metric-drop", "1", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_recovery_wins_back_agreement_on_rows_it_never_saw(tiny, tiny_holdout_small, heavy, tmp_path):
    _, pruned = heavy
    out = tmp_path / "recovered.onnx"
    args = ("recover", "--reference", tiny.model, "--pruned", pruned, "--data", tiny_holdout_small,
            "--label-column", "sentiment", "--samples", "320", "--tuning-samples", "64", "--max-steps", "40",
            "--learning-rate", "1e-4", "--max-length", "64", "--cache-dir", tmp_path / "cache", "--json")
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["steps"] >= 10 and report["agreement_after"] > report["agreement_before"]
    assert report["training_rows"] == 320 and report["tuning_rows"] == 64 and report["curve"][0]["step"] == 0
    model = graph_model.load(out)
    seen = len(seen_rows(model))  # training and tuning rows, as digests (duplicate tweets share one)
    assert recorded_kind(model) == "pruned" and 370 <= seen <= 384
    folder = tmp_path / "recovered.model"
    config = json.loads((folder / "config.json").read_text())
    assert {int(k): len(v) for k, v in config["pruned_heads"].items()} == {0: 8, 1: 8}
    assert config["intermediate_size"] == 96 and (folder / "shipyard_recovery.json").is_file()

    before = _agreement(tiny, tiny_holdout_small, pruned)
    after = _agreement(tiny, tiny_holdout_small, out)
    assert after["gate"]["max_abs_diff"] is None  # gated with the pruned thresholds
    assert after["details"]["left_out_rows_the_artifact_saw"] == seen
    assert after["agreement"] > before["agreement"], (before["agreement"], after["agreement"])

    # The run's recover stage, through the same stage cache: served, the model folder with it.
    entries = sorted((tmp_path / "cache" / "stages").iterdir())
    (tmp_path / "again").mkdir()
    again = invoke(*args, "--out", tmp_path / "again" / "recovered.onnx")
    assert again.exit_code == 0, again.output
    assert sorted((tmp_path / "cache" / "stages").iterdir()) == entries
    assert (tmp_path / "again" / "recovered.onnx").read_bytes() == out.read_bytes()
    assert {p.name: p.read_bytes() for p in (tmp_path / "again" / "recovered.model").iterdir()} == {
        p.name: p.read_bytes() for p in folder.iterdir()}
    assert not [p for p in (tmp_path / "again").iterdir() if p.name.startswith(".")]


def test_recover_refuses_a_graph_without_a_plan_or_with_uneven_layers(tiny, tiny_holdout_small, heavy, tmp_path):
    exported, _ = heavy
    no_plan = invoke("recover", "--reference", tiny.model, "--pruned", exported, "--data", tiny_holdout_small,
                     "--out", tmp_path / "r.onnx")
    assert no_plan.exit_code == 2 and "model.plan.json not found" in no_plan.output
    uneven = tmp_path / "global.onnx"
    assert invoke("prune", "--model", exported, "--out", uneven, "--calibration", tiny_holdout_small, "--tokenizer",
                  tiny.model, "--ffn", "0.5", "--ffn-scope", "global", "--samples", "64", "--max-length", "64",
                  "--quiet").exit_code == 0
    refused = invoke("recover", "--reference", tiny.model, "--pruned", uneven, "--data", tiny_holdout_small,
                     "--out", tmp_path / "r.onnx")
    assert refused.exit_code == 2 and "prune with ffn_scope uniform" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "r.onnx").exists()


@pytest.mark.parametrize("task", TASKS)
def test_every_task_recovers(task, task_models, task_data, tmp_path):  # noqa: F811 (fixtures)
    model, data = task_models[task], task_data[task]
    exported, pruned, out = tmp_path / "model.onnx", tmp_path / "pruned.onnx", tmp_path / "recovered.onnx"
    assert invoke("export", "--model", model, "--out", exported, "--quiet").exit_code == 0
    calibration = COLUMNS[task][:4] if task == "question-answering" else COLUMNS[task][:2]
    result = invoke("prune", "--model", exported, "--out", pruned, "--calibration", data, "--tokenizer", model,
                    "--ffn", "0.5", "--prune-heads", '{"0": [1]}', "--samples", "32", "--max-length", "48",
                    "--quiet", *calibration)
    assert result.exit_code == 0, result.output
    result = invoke("recover", "--reference", model, "--pruned", pruned, "--data", data, "--samples", "96",
                    "--tuning-samples", "32", "--max-steps", "6", "--batch-size", "16", "--max-length", "48",
                    "--out", out, "--json", *calibration)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["steps"] == 6 and len(report["curve"]) >= 2
    kept = min(report["curve"], key=lambda c: c["distance"])  # the check closest to the original is kept
    assert (report["best_step"], report["agreement_after"]) == (kept["step"], kept["agreement"])
    assert out.is_file() and (tmp_path / "recovered.model" / "config.json").is_file()


def test_recovery_keeps_24_sparsity(tiny, tiny_holdout_small, heavy, tmp_path):
    exported, _ = heavy
    sparse = tmp_path / "sparse.onnx"
    assert invoke("prune", "--model", exported, "--out", sparse, "--calibration", tiny_holdout_small, "--tokenizer",
                  tiny.model, "--ffn", "0.5", "--sparsity-24", "ffn", "--samples", "64", "--max-length", "64",
                  "--quiet").exit_code == 0
    out = tmp_path / "recovered.onnx"
    result = invoke("recover", "--reference", tiny.model, "--pruned", sparse, "--data", tiny_holdout_small,
                    "--samples", "64", "--tuning-samples", "32", "--max-steps", "4", "--learning-rate", "1e-3",
                    "--max-length", "64", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    from safetensors.numpy import load_file

    weights = load_file(str(tmp_path / "recovered.model" / "model.safetensors"))
    ffn = [w for name, w in weights.items() if name.endswith(("intermediate.dense.weight", "output.dense.weight"))
           and "attention" not in name]
    assert len(ffn) == 4
    for w in ffn:  # torch [out, in]: groups of 4 along the input (reduction) axis keep at most 2
        groups = w.reshape(w.shape[0], w.shape[1] // 4, 4)
        assert ((groups != 0).sum(-1) <= 2).all()


LOOSE = {"min_agreement": 0.5, "max_metric_drop": 0.3}


def _recovery_recipe(tiny, data, folder, data_section=None, **prune):

    path = write_recipe(
        folder, tiny.model, data,
        stages={"prune": {"enabled": True, "heads_per_layer": 8, **prune,
                          "recover": {"enabled": True, "max_steps": 12, "eval_every": 6, "tuning_samples": 32,
                                      "learning_rate": 1e-4}},
                "quantize": {"formats": ["qdq"], "fallback": {"max_nodes": 0}}},
        data=merged({"training": {"path": str(data), "samples": 160}}, data_section or {}),
        # A dozen steps on the 2-layer model after removing 8 of 12 heads: loose gates, so the run passes.
        thresholds={"pruned": LOOSE, "int8": LOOSE})
    return path


def test_recipe_stage_recovers_and_every_later_artifact_is_made_from_the_recovered_model(
        tiny, tiny_holdout_small, tmp_path):
    """stages.prune.recover: the budget search judges recovered candidates, the recovered graph
    replaces the pruned one, INT8 is made from it, the manifest records the training, no
    evaluation row is trained on, and a rerun reuses the recovery from the cache."""
    from calibration.sampling import row_digest
    from pipeline.recipe import load_recipe
    from pipeline.run.context import RunInputs

    recipe = _recovery_recipe(tiny, tiny_holdout_small, tmp_path, budget={
        "min_agreement": 0.9, "max_fraction": 0.75, "steps": 1, "recovered": True, "trial_steps": 4})
    cache = tmp_path / "cache"
    first = invoke("run", recipe, "--out", tmp_path / "rel", "--cache-dir", cache, "--json")
    assert first.exit_code == 0, first.output
    release = tmp_path / "rel"
    manifest = json.loads((release / "manifest.json").read_text())
    stages = {s["stage"]: s for s in manifest["stages"]}
    recovery = stages["recover"]["details"]["recovery"]
    assert recovery["steps"] in range(1, 13) and recovery["curve"][0]["step"] == 0
    assert manifest["data"]["training"] == {  # its rows are tokenized inside recovery: no length histogram
        "source": str(tiny_holdout_small), "rows": recovery["training_rows"],
        "fingerprint": recovery["training_fingerprint"], "token_lengths": {}}
    names = [a["name"] for a in manifest["artifacts"]]
    assert names[:3] == ["model.fp32", "model.recovered", "model.int8.qdq"]
    assert not (release / "model.pruned.onnx").exists() and (release / "model.pruned.plan.json").is_file()
    recovered = next(a for a in manifest["artifacts"] if a["name"] == "model.recovered")
    int8 = next(a for a in manifest["artifacts"] if a["name"] == "model.int8.qdq")
    assert recovered["kind"] == "pruned" and recovered["parity"]["gate"]["max_abs_diff"] is None
    assert int8["options"]["source_sha256"] == recovered["sha256"]
    # Lineage, recorded once by each stage from its source's: everything after the recovery has it.
    assert {a["name"]: a["from_pruned"] for a in manifest["artifacts"]} == {
        a["name"]: a["name"] != "model.fp32" for a in manifest["artifacts"]}
    from pipeline.run.standalone import artifact_kind

    assert artifact_kind(release / "model.int8.qdq.onnx") == ("int8", "int8", True)  # what shipyard build records
    trials = stages["prune"]["details"]["budget_trials"]  # each candidate judged after 4 recovery steps
    assert len(trials) in (1, 2, 3)
    passing = [t["ffn_fraction"] for t in trials if t["agreement"] >= 0.9]  # the budget's min_agreement
    assert stages["prune"]["details"]["ffn_fraction"] == max(passing, default=0.0)
    html = (release / "report.html").read_text()  # the search and the recovery, drawn
    assert 'id="plot-budget"' in html and 'id="plot-recovery"' in html

    inputs = RunInputs.of(load_recipe(recipe))
    evaluation = {row_digest(inputs.prepared.evaluation.columns, r) for r in inputs.prepared.evaluation.rows}
    trained = set(seen_rows(graph_model.load(release / "model.recovered.onnx")))
    assert trained and not trained & evaluation

    # The recovered PyTorch model, plan and config ship listed and verified like the graphs.
    roles = {name: record["role"] for name, record in manifest["files"].items()}
    assert roles["model.recovered.model/model.safetensors"] == "recovered-model"
    assert roles["model.pruned.plan.json"] == "plan" and roles["model.pruned.config.json"] == "config"
    weights = release / "model.recovered.model" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    damaged = invoke("verify", release)
    assert damaged.exit_code == 1 and "model.recovered.model/model.safetensors: recovered-model, sha256 differs" \
        in damaged.output, damaged.output
    weights.write_bytes(original)

    again = invoke("run", recipe, "--out", tmp_path / "rel", "--overwrite", "--cache-dir", cache, "--json")
    assert again.exit_code == first.exit_code, again.output
    rerun = {s["stage"]: s for s in json.loads((release / "manifest.json").read_text())["stages"]}
    assert rerun["prune"]["cached"] and rerun["recover"]["cached"]


def test_recipe_recovery_needs_training_data(tiny, tiny_holdout_small, tmp_path):
    path = _recovery_recipe(tiny, tiny_holdout_small, tmp_path, {"training": None})
    result = invoke("run", path, "--out", tmp_path / "rel")
    assert result.exit_code == 2 and "needs data.training" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "rel").exists()


def test_recipe_training_data_is_checked_before_any_stage(tiny, tiny_holdout_small, tmp_path):
    """A training file without the text column fails at once, naming the file and the column,
    before export spends any time (nothing reaches the stage cache)."""
    other = tmp_path / "other.csv"
    other.write_text("body,gold\nfine,positive\n")
    path = _recovery_recipe(tiny, tiny_holdout_small, tmp_path,
                            {"training": {"path": str(other), "samples": 160}})
    cache = tmp_path / "cache"
    result = invoke("run", path, "--out", tmp_path / "rel", "--cache-dir", cache)
    assert result.exit_code == 2, result.output
    assert f"data {other} has no column 'text'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "rel").exists()
    assert not any(p.is_file() for p in cache.rglob("*.json"))


@pytest.mark.parametrize("flag, expected", [((), False), (("--dropout",), True)])
def test_the_student_trains_without_dropout_unless_asked(flag, expected, tiny, tiny_holdout_small, heavy, tmp_path,
                                                         monkeypatch):
    """Distillation fits the original's function: by default every training forward pass runs with
    dropout off (modules in eval mode); --dropout turns the model's own dropout back on."""
    import torch

    import pipeline.stages.prune.recover as recover_module

    modes = []
    forward = recover_module._student_outputs

    def recording(model, batch, task, hidden=False):
        if torch.is_grad_enabled():  # the student's training pass (the teacher runs under no_grad)
            modes.append(model.training)
        return forward(model, batch, task, hidden)

    monkeypatch.setattr(recover_module, "_student_outputs", recording)
    _, pruned = heavy
    result = invoke("recover", "--reference", tiny.model, "--pruned", pruned, "--data", tiny_holdout_small,
                    "--samples", "64", "--tuning-samples", "32", "--max-steps", "3", "--max-length", "64",
                    "--out", tmp_path / "r.onnx", "--quiet", *flag)
    assert result.exit_code == 0, result.output
    assert modes == [expected] * 3


def test_recovery_keeps_the_closest_check_when_agreement_cannot_tell_them_apart(tiny, tiny_holdout_small, heavy,
                                                                               tmp_path, monkeypatch):
    """An embedding model pruned hard agrees on no tuning row (cosine < 0.99) until it has trained a
    while, so its agreement is flat at 0 for every check. Recovery must still keep the state whose
    outputs are closest to the teacher's, not the pruned model it started from. Flat agreement is
    forced here so the rule is checked on the tiny classifier, whose logits training does move.
    (Keeping the most agreeing check, as recovery once did, kept step 0 here.)"""
    from pipeline.parity.tasks import Task

    monkeypatch.setattr(Task, "agreement_rate", lambda self, reference, candidate, batches: 0.0)
    _, pruned = heavy
    out = tmp_path / "r.onnx"
    result = invoke("recover", "--reference", tiny.model, "--pruned", pruned, "--data", tiny_holdout_small,
                    "--samples", "128", "--tuning-samples", "32", "--max-steps", "8", "--eval-every", "2",
                    "--patience", "8", "--learning-rate", "1e-3", "--max-length", "64", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [c["step"] for c in report["curve"]] == [0, 2, 4, 6, 8] and {c["agreement"] for c in report["curve"]} == {0.0}
    closest = min(report["curve"], key=lambda c: c["distance"])
    assert report["best_step"] == closest["step"] > 0
    assert report["distance_after"] == closest["distance"] < report["distance_before"]


def test_embedding_distance_is_one_minus_the_mean_cosine():
    import numpy as np

    from pipeline.parity.tasks import Task

    task = Task("feature-extraction")
    batch = {"attention_mask": np.ones((2, 3), dtype=np.int64)}
    reference = [{"embedding": np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)}]
    candidate = [{"embedding": np.array([[1.0, 1.0], [0.0, 5.0]], dtype=np.float32)}]
    assert task.distance(reference, candidate, [batch]) == pytest.approx(1 - (np.sqrt(0.5) + 1.0) / 2)
    assert task.distance(reference, reference, [batch]) == pytest.approx(0.0, abs=1e-12)


def test_standalone_validate_gates_a_converted_artifact_against_its_source(tiny, tiny_holdout_small, heavy,
                                                                          tmp_path):
    """`validate --source`: the pruned gate against the reference and the INT8 gate, set by the
    threshold options, against the graph the artifact was quantized from; naming the wrong source
    fails on that gate alone."""
    exported, pruned = heavy
    int8 = tmp_path / "heavy.int8.onnx"
    result = invoke("quantize", "--model", pruned, "--out", int8, "--calibration", tiny_holdout_small,
                    "--tokenizer", tiny.model, "--samples", "64", "--tuning-samples", "0", "--max-length", "64",
                    "--quiet")
    assert result.exit_code == 0, result.output

    def validate(source):
        result = invoke("validate", "--reference", tiny.model, "--artifact", int8, "--data", tiny_holdout_small,
                        "--label-column", "sentiment", "--samples", "300", "--max-length", "64",
                        "--min-agreement", "0.96", "--max-metric-drop", "0.05", "--source", source, "--json")
        return result.exit_code, json.loads(result.output)

    # Heavy pruning of the 2-layer model: against PyTorch the pruned gate's 0.95 is missed.
    code, report = validate(pruned)
    step = report["details"]["source"]
    assert code == 1 and step["path"] == str(pruned) and step["passed"], report
    assert report["gate"] == {"min_agreement": 0.95, "min_agreement_lower": None, "max_abs_diff": None, "max_metric_drop": 0.02}
    assert step["gate"] == {"min_agreement": 0.96, "min_agreement_lower": None, "max_abs_diff": None, "max_metric_drop": 0.05}
    assert step["agreement"] > report["agreement"] + 0.05  # far closer to its source than to PyTorch
    assert not any(f.startswith("vs ") for f in report["failures"])
    code, report = validate(exported)  # the unpruned graph: not what it was made from
    assert code == 1 and not report["details"]["source"]["passed"]
    assert any(f.startswith("vs model.onnx: agreement") for f in report["failures"])


def test_recover_honours_allow_pickle(tiny, tiny_holdout_small, heavy, model_copy, tmp_path):
    """A reference with only pickle weights is refused in one line naming --allow-pickle, and
    with it teacher and student load (torch.load with weights_only) and recovery runs."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(model_copy / "model.safetensors")), model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    _, pruned = heavy
    args = ["recover", "--reference", model_copy, "--pruned", pruned, "--data", tiny_holdout_small, "--samples", "64",
            "--tuning-samples", "32", "--max-steps", "2", "--max-length", "64", "--quiet", "--no-cache"]
    refused = invoke(*args, "--out", tmp_path / "r.onnx")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "r.onnx").exists()
    allowed = invoke(*args, "--out", tmp_path / "r.onnx", "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "r.onnx").is_file()


def test_labels_given_as_class_ids_train_as_names_do(tiny, tiny_holdout_small, heavy, tmp_path):
    """One label mapping for gates and recovery: a training file whose labels are class ids
    (0/1/2, the usual export of a labelled dataset) gives the label term names give, and that
    term is really in the loss (without labels the first loss differs); an unknown label is
    refused in one line naming it and the column, before any training, with nothing written."""
    import csv

    _, pruned = heavy
    label2id = json.loads((tiny.model / "config.json").read_text())["label2id"]
    with tiny_holdout_small.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    def data(name: str, relabel) -> Path:
        path = tmp_path / name
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["tweet", "mood"])
            writer.writeheader()
            writer.writerows({"tweet": r["text"], "mood": relabel(r["sentiment"])} for r in rows)
        return path

    def recover(path: Path, *labels: str):
        out = tmp_path / f"{path.stem}-{len(labels)}" / "r.onnx"
        return out, invoke("recover", "--reference", tiny.model, "--pruned", pruned, "--data", path, "--text-column",
                           "tweet", *labels, "--samples", "64", "--tuning-samples", "16", "--max-steps", "2",
                           "--label-weight", "0.5", "--max-length", "32", "--no-cache", "--json", "--out", out)

    names, ids = data("names.csv", str), data("ids.csv", lambda name: label2id[name])
    losses = {}
    for path, labels in ((names, ("--label-column", "mood")), (ids, ("--label-column", "mood")), (names, ())):
        _, result = recover(path, *labels)
        assert result.exit_code == 0, result.output
        losses[(path.name, bool(labels))] = json.loads(result.output)["curve"]
    assert losses[("ids.csv", True)] == losses[("names.csv", True)]
    assert losses[("names.csv", True)][1]["loss"] != losses[("names.csv", False)][1]["loss"]

    typo = data("typo.csv", lambda name: "neutrall" if name == "neutral" else name)
    out, result = recover(typo, "--label-column", "mood")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "'neutrall'" in result.output and "'mood'" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.parent.exists()  # the folder the command made for --out is gone again


@pytest.mark.gpu
def test_recovery_distils_on_the_gpu_when_there_is_one(tiny, tiny_holdout_small, heavy, tmp_path):
    """`model.device: auto` (the default) puts distillation on the GPU: the student trains there and
    wins agreement back as on the CPU (compared within the gate, not bit for bit)."""
    from calibration.sampling import Columns
    from pipeline.parity.runners import torch_device
    from pipeline.recipe import RecoverSpec
    from pipeline.stages.prune.recover import TrainingData, recover

    assert torch_device("auto") == "cuda"
    _, pruned = heavy
    spec = RecoverSpec(enabled=True, max_steps=40, learning_rate=1e-4, tuning_samples=64)
    result, report = recover(tiny.model, pruned, TrainingData(tiny_holdout_small, Columns("text", None, "sentiment"),
                                                              320), tmp_path / "recovered.onnx", spec, 64,
                             device="cuda")
    assert result.passed and report.agreement_after > report.agreement_before
