"""Every bad input: exit 2, one line naming the thing and the fix, no traceback, no output left."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import write_recipe
from pipeline.cli import cli


def run_cli(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def assert_clean_failure(result, *fragments, out: Path | None = None):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(message) == 1, result.output
    for fragment in fragments:
        assert fragment in message[0], message[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*")), "a temporary file was left behind"


def test_model_folder_missing(tmp_path):
    out = tmp_path / "m.onnx"
    result = run_cli(["export", "--model", tmp_path / "nope", "--out", out])
    assert_clean_failure(result, "model folder", "not found", out=out)


def test_folder_without_tokenizer(model_copy, tmp_path):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (model_copy / name).unlink(missing_ok=True)
    out = tmp_path / "m.onnx"
    result = run_cli(["export", "--model", model_copy, "--out", out])
    assert_clean_failure(result, "has no tokenizer", "save_pretrained", out=out)


def test_model_type_not_bert_family(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m.onnx"
    result = run_cli(["export", "--model", model_copy, "--out", out])
    assert_clean_failure(result, "'gpt2'", "not BERT-family", out=out)


def test_unknown_task(tiny, tmp_path):
    result = run_cli(["export", "--model", tiny.model, "--out", tmp_path / "m.onnx", "--task", "translation"])
    assert result.exit_code == 2 and "translation" in result.output and "Traceback" not in result.output
    recipe = write_recipe(tmp_path, tiny.model, tmp_path / "d.csv")
    result = run_cli(["run", recipe, "--set", "model.task=translation", "--out", tmp_path / "r"])
    assert_clean_failure(result, "model.task", out=tmp_path / "r")


@pytest.fixture(scope="module")
def onnx_file(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert run_cli(["export", "--model", tiny.model, "--out", out, "--quiet"]).exit_code == 0
    return out


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_onnx(onnx_file, tiny, tiny_holdout_small, tmp_path, damage):
    broken = tmp_path / "broken.onnx"
    data = onnx_file.read_bytes()
    broken.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"not an onnx model")
    out = tmp_path / "q.onnx"
    result = run_cli(["quantize", "--model", broken, "--out", out, "--format", "cpu"])
    assert_clean_failure(result, "broken.onnx", "truncated or corrupt", out=out)
    result = run_cli(["validate", "--reference", tiny.model, "--artifact", broken, "--data", tiny_holdout_small])
    assert_clean_failure(result, "truncated or corrupt")


def test_data_missing_empty_or_without_column(tiny, onnx_file, tiny_holdout_small, tmp_path):
    base = ["validate", "--reference", tiny.model, "--artifact", onnx_file]
    assert_clean_failure(run_cli(base + ["--data", tmp_path / "none.csv"]), "none.csv", "not found")
    (tmp_path / "empty.jsonl").write_text("")
    assert_clean_failure(run_cli(base + ["--data", tmp_path / "empty.jsonl"]), "empty.jsonl", "is empty")
    assert_clean_failure(run_cli(base + ["--data", tiny_holdout_small, "--text-column", "tweet"]),
                         "no column 'tweet'", "columns: text, sentiment")


def test_labels_unknown_to_the_model(tiny, onnx_file, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": lab}) + "\n"
                            for i, lab in enumerate(["positive", "furious", "neutral"])))
    result = run_cli(["validate", "--reference", tiny.model, "--artifact", onnx_file, "--data", data,
                      "--label-column", "label"])
    assert_clean_failure(result, "['furious']", "id2label")


def test_fewer_calibration_rows_than_asked(tiny, tiny_holdout_small, tmp_path):
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small)
    out = tmp_path / "release"
    result = run_cli(["run", recipe, "--out", out, "--set", "data.calibration.samples=5000"])
    assert_clean_failure(result, "calibration asks for 5000 rows", out=out)


def test_output_folder_not_writable(tiny, tiny_holdout_small, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_cli(["export", "--model", tiny.model, "--out", blocker / "sub" / "m.onnx"])
    assert_clean_failure(result, "not writable", "--out")
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small)
    result = run_cli(["run", recipe, "--out", blocker / "release"])
    assert_clean_failure(result, "not writable")


def test_recipe_unknown_key_and_wrong_type(tiny, tiny_holdout_small, tmp_path):
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small)
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"] = {"quantize": {"formats": ["qdq"], "bits": 4}}
    recipe.write_text(yaml.safe_dump(raw))
    assert_clean_failure(run_cli(["run", recipe, "--out", tmp_path / "r"]), "stages.quantize.bits", "unknown key")
    raw["stages"] = {"quantize": {"formats": "int8"}}
    recipe.write_text(yaml.safe_dump(raw))
    assert_clean_failure(run_cli(["run", recipe, "--out", tmp_path / "r"]), "stages.quantize.formats")


def test_quantize_without_calibration_data(onnx_file, tmp_path):
    out = tmp_path / "q.onnx"
    assert_clean_failure(run_cli(["quantize", "--model", onnx_file, "--out", out]),
                         "--calibration", out=out)
