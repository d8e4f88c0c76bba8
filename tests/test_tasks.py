"""Every task through every stage: token classification, question answering, sentence embeddings
(text classification is what the rest of the suite runs). Models are small and random-weight;
texts are real tweets, with gold labels built by rules a reader can check."""

import json

import numpy as np
import pytest
from conftest import invoke
from test_predict import assert_predict_reproduces_the_gate
from test_triton import assert_served_like_predict
from zoo import make_model

from pipeline.parity.metrics import entities, entity_scores, squad_scores
from pipeline.parity.tasks import Pooling, Task, best_spans, max_abs_diff
from pipeline.run.demo import minilm_dir, read_tweets

TASKS = ("token-classification", "question-answering", "feature-extraction")
COLUMNS = {  # the CLI's column options per task: words and tags, question/context/answer, text
    "token-classification": ["--text-column", "words", "--label-column", "tags"],
    "question-answering": ["--text-column", "question", "--text-pair-column", "context", "--label-column", "answer"],
    "feature-extraction": ["--text-column", "text"],
}



def _tags(words):
    """Capitalised words as PER entities (B- then I- for a run), the rest O: checkable by eye."""
    tags, previous = [], False
    for word in words:
        entity = word[:1].isupper()
        tags.append(("I-PER" if previous else "B-PER") if entity else "O")
        previous = entity
    return tags


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """task -> jsonl file of 240 real tweets shaped for that task."""
    folder = tmp_path_factory.mktemp("task-data")
    tweets = [t["text"] for t in read_tweets()[:600] if len(t["text"].split()) >= 4][:240]
    rows = {
        "token-classification": [{"words": t.split()[:20], "tags": _tags(t.split()[:20])} for t in tweets],
        "question-answering": [{"question": "Which word comes first?", "context": t, "answer": t.split()[0]}
                               for t in tweets],
        "feature-extraction": [{"text": t} for t in tweets],
    }
    paths = {}
    for task, task_rows in rows.items():
        paths[task] = folder / f"{task}.jsonl"
        paths[task].write_text("\n".join(json.dumps(r) for r in task_rows) + "\n")
    return paths


@pytest.fixture(scope="module")
def task_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-models")
    return {task: make_model(root / task, "bert", task, head_scale=30.0) for task in TASKS}


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_each_task_goes_through_every_stage_from_the_cli(task, task_models, task_data, tmp_path):
    model, data = task_models[task], task_data[task]
    exported = tmp_path / "model.onnx"
    result = invoke("export", "--model", model, "--out", exported, "--json")  # task read from the head
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["task"] == task and json.loads(result.output)["max_abs_diff"] <= 1e-4

    def validate(artifact, *extra):
        result = invoke("validate", "--reference", model, "--artifact", artifact, "--data", data, "--samples", "96",
                        "--max-length", "48", "--json", *COLUMNS[task], *extra)
        assert result.exit_code in (0, 1), result.output
        return json.loads(result.output)

    report = validate(exported)
    assert report["passed"] and report["task"] == task and report["agreement"] == 1.0
    assert report["units"] > (96 if task == "token-classification" else 95)  # tokens are scored per word

    calibration = COLUMNS[task][:4] if task == "question-answering" else COLUMNS[task][:2]
    pruned = tmp_path / "pruned.onnx"
    result = invoke("prune", "--model", exported, "--out", pruned, "--calibration", data, "--tokenizer", model,
                    "--ffn", "0.1", "--prune-heads", '{"0": [1]}', "--samples", "32", "--max-length", "48", "--quiet",
                    *calibration)
    assert result.exit_code == 0, result.output
    assert validate(pruned, "--min-agreement", "0.5")["gate"]["max_abs_diff"] is None  # the pruned gate

    for fmt in ("qdq", "cpu"):
        out = tmp_path / f"int8.{fmt}.onnx"
        result = invoke("quantize", "--model", exported, "--out", out, "--format", fmt, "--calibration", data,
                        "--tokenizer", model, "--samples", "32", "--tuning-samples", "32", "--max-length", "48",
                        "--quiet", *calibration)
        assert result.exit_code == 0, result.output
        report = validate(out, "--min-agreement", "0.8")
        assert report["passed"], report["failures"]
    assert invoke("trt-check", tmp_path / "int8.qdq.onnx").exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_recipe_runs_each_task_end_to_end(task, task_models, task_data, tmp_path):
    import yaml

    columns = dict(zip(COLUMNS[task][::2], COLUMNS[task][1::2], strict=True))
    data = {"calibration": {"path": str(task_data[task]), "samples": 32},
            "evaluation": {"path": str(task_data[task]), "samples": 96},
            "tuning_samples": 32,
            "text_column": columns["--text-column"], "max_length": 48,
            "text_pair_column": columns.get("--text-pair-column"), "label_column": columns.get("--label-column")}
    recipe = {
        "name": f"tiny-{task}", "model": {"path": str(task_models[task])}, "data": data,
        "stages": {"prune": {"enabled": True, "heads": {0: [1]}}, "quantize": {"fallback": {"max_nodes": 4}}},
        "targets": [{"name": "l4-int8", "arch": "sm_89", "precision": "int8",
                     "profiles": [{"batch": {"min": 1, "opt": 8, "max": 32}, "sequence": {"min": 8, "opt": 48, "max": 64}}]}],
        # Tiny models: INT8 kernels do not pay at this size, so the speed gate is off (test_speed_gate.py).
        "thresholds": {"int8": {"min_agreement": 0.8, "min_speedup": None}, "pruned": {"min_agreement": 0.5}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "release"
    result = invoke("run", path, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["task"] == task
    names = {a["name"]: a for a in manifest["artifacts"]}
    assert set(names) >= {"model.fp32", "model.pruned", "model.int8.qdq", "model.int8.cpu", "model.trt.int8-fp16"}
    assert names["model.fp32"]["parity"]["agreement"] == 1.0 and all(a["passed"] for a in names.values())
    metric = {"token-classification": "entity_f1", "question-answering": "f1", "feature-extraction": None}[task]
    assert names["model.int8.qdq"]["parity"]["metric"] == metric
    assert manifest["targets"][0]["readiness"]["ready"]
    assert f"Task: {task}" in (out / "report.md").read_text()
    # The release serves alone: predict on the gate's rows agrees with PyTorch as the gate measured.
    served = assert_predict_reproduces_the_gate(out, tmp_path)
    if task == "token-classification":
        assert all(len(row["words"]) == len(row["tags"]) > 0 for row in served)
    elif task == "feature-extraction":  # MiniLM-style mean pooling, unnormalised unless its config says so
        assert len(served[0]["embedding"]) == 64
    assert_served_like_predict(out, tmp_path)  # and a real Triton server serves what predict gives
    html = (out / "report.html").read_text()  # the report to look at, for every task
    assert all(f'id="{plot}"' in html for plot in ("plot-agreement", "plot-differences", "plot-lengths"))


def test_strict_iob2_entities_and_scores_match_hand_computation():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entities(["I-PER", "I-PER", "B-LOC", "I-PER"]) == {("LOC", 2, 2)}  # strict: no chunk starts with I-
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG"]]
    scores = entity_scores(gold, predicted)  # gold 3 entities, predicted 3, right 2 (LOC, ORG)
    assert scores["entity_precision"] == pytest.approx(2 / 3) and scores["entity_recall"] == pytest.approx(2 / 3)
    assert scores["token_accuracy"] == pytest.approx(5 / 6)


def test_squad_exact_match_and_f1_normalise_like_squad():
    scores = squad_scores(["The Eiffel Tower!", "in Paris"], [["eiffel tower"], ["Paris, France", "Paris"]])
    assert scores["exact_match"] == 0.5  # "in Paris" != "Paris"
    assert scores["f1"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_best_span_stays_in_the_context_ordered_and_short():
    start = np.array([[9.0, 0.0, 1.0, 0.0, 5.0, 0.0]])
    end = np.array([[9.0, 0.0, 0.0, 4.0, 0.0, 6.0]])
    context = np.array([[False, False, True, True, True, True]])  # position 0 is the question
    assert best_spans(start, end, context, 30).tolist() == [[4, 5]]
    assert best_spans(start, end, context, 1).tolist() == [[5, 5]]  # one token: 0 + 6 beats 5 + 0
    assert best_spans(start, end, np.zeros_like(context), 30).tolist() == [[-1, -1]]



def test_output_differences_skip_padding_only_for_per_token_outputs():
    """An embedding as wide as the padded batch is long ([2, 4] against a [2, 4] mask) is compared
    in full; token logits are compared only where the mask has tokens."""
    batch = {"attention_mask": np.array([[1, 1, 1, 1], [1, 1, 0, 0]])}
    reference = np.zeros((2, 4), dtype=np.float32)
    candidate = reference.copy()
    candidate[1, 3] = 0.5  # a padding position for tokens, the last unit for an embedding
    embedding = Task("feature-extraction")
    assert max_abs_diff([{"embedding": reference}], [{"embedding": candidate}], [batch], embedding.per_token)[0] == 0.5
    spans = Task("question-answering")
    got = max_abs_diff([{"start_logits": reference}], [{"start_logits": candidate}], [batch], spans.per_token)
    assert got == (0.0, 0.0)

def test_real_minilm_pools_as_its_sentence_transformers_config_says(tmp_path):
    """all-MiniLM-L6-v2 as shipped: mean pooling then L2 normalisation, read from modules.json;
    the exported graph's embeddings equal PyTorch's computed that way."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    pooling = Pooling.of(minilm_dir())
    assert pooling == Pooling("mean", True)
    out = tmp_path / "minilm.onnx"
    result = invoke("export", "--model", minilm_dir(), "--out", out, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["task"] == "feature-extraction", result.output
    texts = ["the train was late again", "I love this song"]
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(str(minilm_dir())).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    from pipeline.parity.runners import OrtRunner

    feed = {k: v.numpy() for k, v in batch.items()}
    got = pooling(OrtRunner(out).infer(feed)["last_hidden_state"], feed["attention_mask"])
    assert np.abs(got - expected).max() < 1e-5 and np.allclose(np.linalg.norm(got, axis=1), 1.0)


@pytest.mark.parametrize("head, message", [
    ("BertForMultipleChoice", "is not a task Shipyard supports"),
    ("BertForMaskedLM", "is not a task Shipyard supports"),
])
def test_unsupported_heads_are_refused(task_models, tmp_path, head, message):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(task_models["token-classification"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [head]
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m.onnx"
    result = invoke("export", "--model", folder, "--out", out)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_task_that_does_not_match_the_head_is_refused(task_models, tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke("export", "--model", task_models["token-classification"], "--out", out,
                    "--task", "question-answering")
    assert result.exit_code == 2, result.output
    assert "does not match its head BertForTokenClassification (token-classification)" in result.output
    assert not out.exists()


@pytest.mark.parametrize("task, rows, message", [
    ("token-classification", [{"words": ["John", "runs"], "tags": "B-PER O"}], "not a list of tags per word"),
    ("token-classification", [{"words": ["John", "runs"], "tags": ["B-PER"]}], "1 tags for 2 words"),
    ("token-classification", [{"words": ["John", "runs"], "tags": ["B-XYZ", "O"]}], "are not in the model's id2label"),
    ("question-answering", [{"question": "Who?", "context": "John runs.", "answer": "Mary"}], "not found in its context"),
    ("feature-extraction", [{"text": "hello", "answer": "x"}], "feature-extraction has no gold labels"),
])
def test_gold_labels_that_do_not_fit_the_task_are_refused(task_models, tmp_path, task, rows, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    columns = {"token-classification": ["--text-column", "words", "--label-column", "tags"],
               "question-answering": COLUMNS["question-answering"],
               "feature-extraction": ["--text-column", "text", "--label-column", "answer"]}[task]
    # Any ONNX file will do: the data is refused before the artifact runs.
    exported = tmp_path / "m.onnx"
    assert invoke("export", "--model", task_models[task], "--out", exported, "--quiet").exit_code == 0
    result = invoke("validate", "--reference", task_models[task], "--artifact", exported, "--data", data,
                    "--max-length", "32", *columns)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("family, task", [("distilbert", "question-answering"), ("roberta", "token-classification"),
                                          ("electra", "feature-extraction"), ("albert", "token-classification")])
def test_other_families_serve_each_task(family, task, task_data, tmp_path):
    """Tasks are not BERT-only: the head's inputs and outputs come from the graph and forward()."""
    model = make_model(tmp_path / "m", family, task, head_scale=30.0)
    exported = tmp_path / "model.onnx"
    result = invoke("export", "--model", model, "--out", exported, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["task"] == task, result.output
    result = invoke("validate", "--reference", model, "--artifact", exported, "--data", task_data[task],
                    "--samples", "64", "--max-length", "48", "--json", *COLUMNS[task])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["agreement"] == 1.0
