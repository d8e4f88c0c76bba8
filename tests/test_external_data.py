"""A model whose weights live in external data (past protobuf's 2 GB limit) goes through every
stage, the stage cache, the manifest and verify. The tiny model stands in for a large one: the
size past which Shipyard writes external data is lowered for these tests. The same path on a real
2.2 GB model is `bench/large_model.py`."""

import json

import pytest
from click.testing import CliRunner
from conftest import TINY_TARGETS, without_tensorrt, write_recipe

from pipeline.artifacts import external_data_files
from pipeline.cli import cli
from pipeline.graph import model as graph_model
from pipeline.release.signing import verify_folder


@pytest.fixture
def small_external_threshold(monkeypatch, tmp_path_factory):
    monkeypatch.setattr(graph_model, "EXTERNAL_DATA_ABOVE", 1 << 20)
    # A stage cache of its own: the threshold is not in the cache key (it is a constant outside
    # tests), so an entry another test stored with inline weights would be served here.
    monkeypatch.setenv("SHIPYARD_CACHE_DIR", str(tmp_path_factory.mktemp("external-data-cache")))


def test_a_release_with_external_data_is_listed_verified_and_cached(tiny, tiny_holdout_small, tmp_path,
                                                                   small_external_threshold):
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small,
                          stages={"prune": {"enabled": True, "ffn_fraction": 0.25}}, targets=TINY_TARGETS[1:])
    cache = tmp_path / "cache"

    def run(out):
        with without_tensorrt():
            result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--cache-dir", str(cache),
                                              "--json"])
        assert result.exit_code == 0, result.output
        return json.loads((out / "manifest.json").read_text())

    manifest = run(tmp_path / "first")
    external = {a["path"]: list(a["external_data"]) for a in manifest["artifacts"]}
    # Export keeps Optimum's inline graph (it is small); every graph a stage rewrites is external.
    assert external["model.onnx"] == []
    for path in ("model.pruned.onnx", "model.int8.qdq.onnx", "model.int8.cpu.onnx", "model.trt.fp16.onnx"):
        assert external[path] == [f"{path}_data"], external
    for artifact in manifest["artifacts"]:
        files = external_data_files(tmp_path / "first" / artifact["path"])
        assert [f.name for f in files] == list(artifact["external_data"])
        assert artifact["size_bytes"] == sum(p.stat().st_size for p in [tmp_path / "first" / artifact["path"], *files])
    assert verify_folder(tmp_path / "first") == []

    # From the cache: the data files come back with their graphs, byte for byte.
    again = run(tmp_path / "second")
    assert all(s["cached"] for s in again["stages"] if s["stage"] in ("prune", "quantize[qdq]"))
    assert [(a["sha256"], a["external_data"]) for a in again["artifacts"]] == \
        [(a["sha256"], a["external_data"]) for a in manifest["artifacts"]]
    assert verify_folder(tmp_path / "second") == []

    data = tmp_path / "first" / "model.pruned.onnx_data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    assert verify_folder(tmp_path / "first") == [
        "model.pruned.onnx_data: model.pruned.onnx's external data, sha256 differs from the manifest"]
    data.unlink()
    assert verify_folder(tmp_path / "first") == [
        "model.pruned.onnx_data: model.pruned.onnx's external data, listed in the manifest but missing"]


def test_standalone_commands_carry_external_data(tiny, tiny_holdout_small, tmp_path, small_external_threshold):
    exported = tmp_path / "model.onnx"
    pruned = tmp_path / "pruned.onnx"
    qdq = tmp_path / "pruned.int8.qdq.onnx"
    invoke = CliRunner().invoke
    assert invoke(cli, ["export", "--model", str(tiny.model), "--out", str(exported), "--quiet"]).exit_code == 0
    result = invoke(cli, ["prune", "--model", str(exported), "--out", str(pruned), "--tokenizer", str(tiny.model),
                          "--calibration", str(tiny_holdout_small), "--ffn", "0.25", "--samples", "32",
                          "--max-length", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [f.name for f in external_data_files(pruned)] == ["pruned.onnx_data"]
    result = invoke(cli, ["quantize", "--model", str(pruned), "--out", str(qdq), "--format", "qdq",
                          "--calibration", str(tiny_holdout_small), "--tokenizer", str(tiny.model), "--samples", "32",
                          "--tuning-samples", "16", "--max-length", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert [f.name for f in external_data_files(qdq)] == ["pruned.int8.qdq.onnx_data"]
    result = invoke(cli, ["validate", "--reference", str(tiny.model), "--artifact", str(qdq), "--data",
                          str(tiny_holdout_small), "--samples", "64", "--max-length", "32", "--min-agreement", "0",
                          "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["agreement"] > 0.8
    # Nothing but the artifacts and their data is left beside them.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pruned")) == [
        "pruned.config.json", "pruned.int8.qdq.onnx", "pruned.int8.qdq.onnx_data", "pruned.onnx",
        "pruned.onnx_data", "pruned.plan.json"]
