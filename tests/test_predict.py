"""`shipyard predict` serves a release alone and reproduces what its gate measured: on the gate's
evaluation rows, its predictions agree with PyTorch's exactly as the manifest's agreement says."""

import json
import shutil

import numpy as np
import pytest
from conftest import invoke

pytestmark = pytest.mark.slow


def assert_predict_reproduces_the_gate(out, tmp_path, artifact="model.int8.cpu"):
    """Predict on the release's evaluation rows (drawn again from its recipe and checked against
    its fingerprint) and measure agreement with PyTorch as the gate does, by unit: classes per
    row, tags per scored word, answer spans per row, embeddings within min_cosine."""
    from calibration.encode import load_tokenizer
    from pipeline.inputs import data as datamod
    from pipeline.inputs.model import inspect_model
    from pipeline.parity.runners import TorchRunner
    from pipeline.parity.tasks import collect, cosine, readable
    from pipeline.recipe import Recipe

    manifest = json.loads((out / "manifest.json").read_text())
    recipe = Recipe.model_validate(manifest["recipe"])
    info = inspect_model(recipe.model.path, recipe.model.task)
    task = info.task(recipe.model.max_answer_tokens, recipe.thresholds.min_cosine)
    evaluation = datamod.prepare(recipe.data, load_tokenizer(recipe.model.path, task.spec.encoding), info.label2id,
                                 task.name).evaluation
    assert evaluation.fingerprint == manifest["data"]["evaluation"]["fingerprint"]
    text, pair = recipe.data.text_column, recipe.data.text_pair_column
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"t": r[text], **({"p": r[pair]} if pair else {})}) + "\n"
                            for r in evaluation.rows))
    result = invoke("predict", out, "--artifact", artifact, "--data", rows, "--text-column", "t", "--truncate",
                    "--json", *(("--pair-column", "p") if pair else ()))
    assert result.exit_code == 0, result.output
    served = json.loads(result.output)["predictions"]
    assert len(served) == len(evaluation.rows)

    reference_outputs = collect(TorchRunner(recipe.model.path, task=task.name), evaluation.batches, task)
    texts = [" ".join(r[text]) if isinstance(r[text], list) else str(r[text]) for r in evaluation.rows]
    reference = readable(task, reference_outputs, evaluation.batches, info.id2label, texts,
                         [str(r[pair]) for r in evaluation.rows] if pair else None)
    kind = task.spec.kind
    if kind == "class":
        agree = [s["label"] == r["label"] for s, r in zip(served, reference, strict=True)]
    elif kind == "tag":
        agree = [a == b for s, r in zip(served, reference, strict=True) for a, b in zip(s["tags"], r["tags"], strict=True)]
    elif kind == "span":
        agree = [(s["start_token"], s["end_token"]) == (r["start_token"], r["end_token"])
                 for s, r in zip(served, reference, strict=True)]
    else:
        got = np.array([s["embedding"] for s in served])
        agree = list(cosine(got, np.array([r["embedding"] for r in reference])) >= task.min_cosine)
    recorded = next(a for a in manifest["artifacts"] if a["name"] == artifact)["parity"]["agreement"]
    assert float(np.mean(agree)) == pytest.approx(recorded, abs=1e-12)
    return served


def test_predict_on_the_gate_s_rows_agrees_as_the_gate_measured(tiny_release, tmp_path):
    served = assert_predict_reproduces_the_gate(tiny_release.out, tmp_path)
    assert {row["label"] for row in served} <= {"negative", "neutral", "positive"}
    assert all(0 < row["score"] <= 1 for row in served)


def test_predict_reads_text_from_the_command_line(tiny_release):
    result = invoke("predict", tiny_release.out, "--text", "what a wonderful day", "--text", "I hate rain")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "model.int8.cpu (text-classification):" and len(lines) == 3
    assert lines[1].split()[0] in ("negative", "neutral", "positive") and lines[1].endswith("what a wonderful day")


def test_predict_refuses_what_it_cannot_serve(tiny_release, tmp_path):
    from test_faults import assert_clean_failure

    long = " ".join(["word"] * 200)
    assert_clean_failure(invoke("predict", tiny_release.out, "--text", long), "longer than the 64", "--truncate")
    assert_clean_failure(invoke("predict", tiny_release.out, "--artifact", "model.nope", "--text", "hi"),
                         "no CPU artifact 'model.nope'", "model.int8.cpu")
    assert_clean_failure(invoke("predict", tiny_release.out), "nothing to predict", "--text")

    damaged = tmp_path / "release"
    shutil.copytree(tiny_release.out, damaged)
    shutil.rmtree(damaged / "tokenizer")
    assert_clean_failure(invoke("predict", damaged, "--text", "hi"), "does not verify", "shipyard verify")
