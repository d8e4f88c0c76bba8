"""`shipyard package --triton`: a repository whose every config parses as Triton's own message,
which verifies, and which a real `tritonserver` serves with the predictions `shipyard predict`
(and so the gate) gives."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke
from test_faults import assert_clean_failure

from pipeline.errors import ShipyardError
from pipeline.release.triton import parse_config

pytestmark = pytest.mark.slow


def test_the_repository_s_configs_parse_as_triton_s_and_it_verifies(tiny_release, tmp_path):
    repo = tmp_path / "repo"
    result = invoke("package", tiny_release.out, "--triton", repo, "--json")
    assert result.exit_code == 0, result.output
    models = json.loads(result.output)["models"]
    assert set(models) >= {"model.int8.cpu", "model.trt.int8-fp16"}
    configs = {p.parent.name: parse_config(p.read_text()) for p in repo.glob("*/config.pbtxt")}
    assert {"preprocess", "postprocess"} <= set(configs)
    cpu = configs["model_int8_cpu"]
    assert cpu.backend == "onnxruntime" and cpu.max_batch_size == 32
    assert [i.name for i in cpu.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert list(cpu.input[0].dims) == [-1] and list(cpu.output[0].dims) == [3]  # no batch axis in dims
    ensemble = configs["model_int8_cpu_text"]
    assert ensemble.platform == "ensemble"
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["preprocess", "model_int8_cpu", "postprocess"]
    assert (repo / "model_int8_cpu" / "1" / "model.onnx").is_file()
    assert invoke("verify", repo).exit_code == 0

    from google.protobuf.text_format import ParseError

    with pytest.raises(ParseError):  # a malformed config is what parse_config exists to catch
        parse_config('name: "x" max_batch_size: "many"')


def test_package_refuses_what_it_cannot_package(tiny_release, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_clean_failure(invoke("package", tiny_release.out, "--triton", tmp_path / "full"), "already exists",
                         "--overwrite")
    assert_clean_failure(invoke("package", tmp_path / "nope", "--triton", tmp_path / "repo"), "not found",
                         out=tmp_path / "repo")


def test_a_real_tritonserver_serves_the_gate_s_predictions(tiny_release, tmp_path):
    """The wheel's tritonserver, Python backend only: the CPU INT8 artifact run by a Python-backend
    model with ONNX Runtime inside the text ensemble. The evaluation rows go in the batches
    `predict` makes (ordered by length, 32 a request: dynamic INT8 scales per batch), over HTTP,
    and every served prediction is `predict`'s."""
    import tritonclient.http as http

    from pipeline.release import triton_server

    try:
        triton_server.wheel()
        triton_server.numpy_1()
    except ShipyardError as err:
        pytest.skip(f"no Triton server to run here: {err}")
    rows = _evaluation_rows(tiny_release.out)
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    predicted = invoke("predict", tiny_release.out, "--data", source, "--truncate", "--json")
    assert predicted.exit_code == 0, predicted.output
    expected = json.loads(predicted.output)["predictions"]

    repo = tmp_path / "repo"
    assert invoke("package", tiny_release.out, "--triton", repo, "--python-runtime").exit_code == 0
    served = []
    with triton_server.serve(repo) as address:
        client = http.InferenceServerClient(address)
        for start in range(0, len(rows), 32):
            texts = rows[start:start + 32]
            text = http.InferInput("TEXT", [len(texts), 1], "BYTES")
            text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
            reply = client.infer("model_int8_cpu_text", [text], outputs=[http.InferRequestedOutput("PREDICTION")])
            served += [json.loads(v[0]) for v in reply.as_numpy("PREDICTION")]
    assert [s["label"] for s in served] == [e["label"] for e in expected]
    assert np.allclose([s["score"] for s in served], [e["score"] for e in expected], atol=1e-6)


def _evaluation_rows(release: Path) -> list[str]:
    """The release's evaluation texts in the order the gate batched them."""
    from calibration.encode import load_tokenizer
    from pipeline.inputs import data as datamod
    from pipeline.inputs.model import inspect_model
    from pipeline.recipe import Recipe

    recipe = Recipe.model_validate(json.loads((release / "manifest.json").read_text())["recipe"])
    info = inspect_model(recipe.model.path, recipe.model.task)
    evaluation = datamod.prepare(recipe.data, load_tokenizer(recipe.model.path, "text"), info.label2id,
                                 info.task_name).evaluation
    return [str(r[recipe.data.text_column]) for r in evaluation.rows]
