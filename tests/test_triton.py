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
from pipeline.release.triton import model_config, parse_config

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


def assert_served_like_predict(release: Path, tmp_path: Path, artifact: str | None = None) -> None:
    """Package `release` for the wheel's tritonserver (Python backend only: the CPU INT8 artifact, or
    `artifact`, run by a Python-backend model with ONNX Runtime or OpenVINO inside the text
    ensemble), send its evaluation rows
    over HTTP in the batches `predict` makes (ordered by length, as many a request as the gate's
    batches: dynamic INT8 scales per batch), and require every served prediction to be `predict`'s."""
    import tritonclient.http as http

    from pipeline.release import serving, triton_server

    try:
        triton_server.wheel()
        triton_server.numpy_1()
    except ShipyardError as err:
        pytest.skip(f"no Triton server to run here: {err}")
    record, _ = serving.load(release)
    texts, pairs = _evaluation_rows(release)
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"t": t, "p": p}) + "\n" for t, p in zip(texts, pairs, strict=True)))
    predicted = invoke("predict", release, "--data", source, "--text-column", "t", "--truncate", "--json",
                       *(("--pair-column", "p") if record.text_pair else ()),
                       *(("--artifact", artifact) if artifact else ()))
    assert predicted.exit_code == 0, predicted.output
    expected = json.loads(predicted.output)["predictions"]

    repo = tmp_path / "repo"
    assert invoke("package", release, "--triton", repo, "--python-runtime").exit_code == 0
    served = []
    with triton_server.serve(repo) as address:
        client = http.InferenceServerClient(address)
        for start in range(0, len(texts), record.batch_size):
            inputs = []
            for name, values in (("TEXT", texts), ("PAIR", pairs)):
                if name == "PAIR" and not record.text_pair:
                    continue
                chunk = values[start:start + record.batch_size]
                tensor = http.InferInput(name, [len(chunk), 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[v.encode()] for v in chunk], dtype=object))
                inputs.append(tensor)
            ensemble = (artifact or "model.int8.cpu").replace(".", "_").replace("-", "_") + "_text"
            reply = client.infer(ensemble, inputs, outputs=[http.InferRequestedOutput("PREDICTION")])
            served += [json.loads(v[0]) for v in reply.as_numpy("PREDICTION")]
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        for key, value in got.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert np.allclose(value, want[key], atol=1e-6), key
            else:
                assert value == want[key], key


def test_a_real_tritonserver_serves_the_gate_s_predictions(tiny_release, tmp_path):
    assert_served_like_predict(tiny_release.out, tmp_path)


def _evaluation_rows(release: Path) -> tuple[list[str], list[str]]:
    """The release's evaluation texts (and second texts, "" without) in the order the gate batched them."""
    from calibration.encode import as_text, load_tokenizer
    from pipeline.inputs import data as datamod
    from pipeline.inputs.model import inspect_model
    from pipeline.recipe import Recipe

    recipe = Recipe.model_validate(json.loads((release / "manifest.json").read_text())["recipe"])
    info = inspect_model(recipe.model.path, recipe.model.task)
    task = info.task()
    evaluation = datamod.prepare(recipe.data, load_tokenizer(recipe.model.path, task.spec.encoding), info.label2id,
                                 info.task_name).evaluation
    text, pair = recipe.data.text_column, recipe.data.text_pair_column
    return ([as_text(r[text]) for r in evaluation.rows], [as_text(r[pair]) if pair else "" for r in evaluation.rows])


def test_a_run_writes_the_repository_beside_the_release_when_the_recipe_asks(tiny, tiny_holdout_small, tmp_path):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, stages={"package": {"triton": True}},
                          targets=[])
    out = tmp_path / "release"
    result = invoke("run", recipe, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    repo = tmp_path / "release.triton"
    assert (repo / "model_int8_cpu_text" / "config.pbtxt").is_file() and invoke("verify", repo).exit_code == 0
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["release"]["folder"] == str(out)


def test_a_target_with_float16_outputs_gets_its_own_types_in_the_repository(tiny, tiny_holdout_small, tmp_path):
    """Each model is described from its own graph: a target that asks for float16 logits gets a
    TYPE_FP16 output, and its ensemble a postprocess of those types (an ensemble's must match)."""
    from conftest import PROFILE, write_recipe

    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, stages={"quantize": {"formats": ["cpu"]}},
                          targets=[{"name": "l4-fp16", "arch": "sm_89", "precision": "fp16", "output_dtype": "fp16",
                                    "profiles": [PROFILE]}])
    out = tmp_path / "release"
    assert invoke("run", recipe, "--out", out, "--quiet").exit_code == 0
    repo = tmp_path / "repo"
    result = invoke("package", out, "--triton", repo, "--json")
    assert result.exit_code == 0, result.output
    configs = {p.parent.name: parse_config(p.read_text()) for p in repo.glob("*/config.pbtxt")}
    half = next(name for name in configs if name.startswith("model_trt_fp16") and not name.endswith("_text"))
    types = model_config().DESCRIPTOR.fields_by_name["output"].message_type.fields_by_name["data_type"].enum_type
    assert [o.data_type for o in configs[half].output] == [types.values_by_name["TYPE_FP16"].number]
    assert configs["model_int8_cpu"].output[0].data_type == types.values_by_name["TYPE_FP32"].number
    steps = {name: [s.model_name for s in c.ensemble_scheduling.step] for name, c in configs.items()
             if c.platform == "ensemble"}
    post = {s[-1] for s in steps.values()}
    assert len(post) == 2  # one postprocess per output signature
    for step in post:
        assert [i.data_type for i in configs[step].input if i.name == "logits"] == [
            configs[next(s[1] for s in steps.values() if s[-1] == step)].output[0].data_type]
