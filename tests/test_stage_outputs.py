"""Where the standalone commands write, and what they trust (issue #29), as fault cases.

One rule for every command that writes, as for `run`: an `--out` in folders that do not exist yet
is made (and the folders removed again when the command fails); an output that exists, or a file
the stage writes beside it, is replaced only with `--overwrite`; `collect` and `engines` hold the
release lock `run` holds; an engine's build record must describe the engine's bytes; and a
library's failure is reported as bad input only when it is the kind the message names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PROFILE, invoke, without_tensorrt
from test_engines import OrtOnBytes
from test_faults import assert_clean_failure, quick_recipe

from pipeline.parity.engine import engine_bytes
from pipeline.stages import build, validate


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "model.onnx"
    assert invoke("export", "--model", tiny.model, "--out", out, "--quiet").exit_code == 0
    return out


def _fake_build_host(monkeypatch) -> None:
    """TensorRT faked as in tests/test_engines.py: the "engine" is the ONNX file's bytes."""
    from pipeline.artifacts import sha256_file

    def copy_as_engine(plan, out, env):
        shutil.copyfile(plan.onnx, out)
        return build.EngineRecord(path=str(out), sha256=sha256_file(out), size_bytes=Path(out).stat().st_size,
                                  trt_version=env.trt_version, gpu_name=env.gpu_name, compute_capability=env.arch,
                                  build_seconds=0.0, plan=plan.to_dict(), timing_cache="none")

    monkeypatch.setattr(build, "build_environment",
                        lambda: build.BuildEnvironment(trt_version="11.5.0", gpu_name="Fake GPU", arch="sm_80"))
    monkeypatch.setattr(build, "check_target_arch", lambda target, env: None)
    monkeypatch.setattr(build, "build_engine", copy_as_engine)


def test_every_standalone_command_writes_into_folders_that_do_not_exist_yet(tiny, tiny_holdout_small, exported,
                                                                             tmp_path, monkeypatch):
    _fake_build_host(monkeypatch)
    new = tmp_path / "new"
    rows = ("--calibration", tiny_holdout_small, "--tokenizer", tiny.model, "--samples", "32", "--max-length", "32")
    commands = {
        new / "export" / "model.onnx": ("export", "--model", tiny.model),
        new / "prune" / "pruned.onnx": ("prune", "--model", exported, *rows, "--ffn", "0.25"),
        new / "quantize" / "int8.onnx": ("quantize", "--model", exported, *rows, "--tuning-samples", "0"),
        new / "recover" / "recovered.onnx": ("recover", "--reference", tiny.model, "--pruned",
                                             new / "prune" / "pruned.onnx", "--data", tiny_holdout_small, "--samples",
                                             "32", "--tuning-samples", "16", "--max-steps", "1", "--max-length", "32"),
        new / "build" / "model.engine": ("build", "--model", exported, "--target", "sm_80"),
    }
    for out, args in commands.items():
        result = invoke(*args, "--out", out, "--quiet")
        assert result.exit_code == 0, (args[0], result.output)
        assert out.is_file(), args[0]
    assert (new / "prune" / "pruned.plan.json").is_file() and (new / "recover" / "recovered.model").is_dir()
    assert json.loads((new / "build" / "model.engine.json").read_text())["precision"] == "fp32"
    report = new / "validate" / "parity.json"
    result = invoke("validate", "--reference", tiny.model, "--artifact", exported, "--data", tiny_holdout_small,
                    "--samples", "32", "--max-length", "32", "--report", report, "--quiet")
    assert result.exit_code == 0 and json.loads(report.read_text())["passed"], result.output
    release = tmp_path / "release"
    target = {"name": "a100-fp16", "arch": "sm_80", "precision": "fp16", "profiles": [PROFILE]}
    with without_tensorrt():
        assert invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small, targets=[target]), "--out",
                      release, "--no-engines", "--quiet").exit_code == 0
    monkeypatch.setattr(validate, "runner_for", lambda path, fmt=None, host_code=False, sha256=None: OrtOnBytes(
        engine_bytes(path, sha256)))
    result = invoke("engines", release, "--target", "a100-fp16", "--out", new / "engines" / "a100-fp16", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("collect", release, new / "engines" / "a100-fp16", "--out", new / "collect" / "shipped", "--quiet")
    assert result.exit_code == 0, result.output
    assert (new / "collect" / "shipped" / "engines" / "a100-fp16.engine").is_file()
    assert not list(new.rglob(".*")), "temporary files or locks were left behind"


def test_a_command_that_fails_removes_the_folders_it_made(tiny, tiny_holdout_small, exported, tmp_path):
    pruned = tmp_path / "pruned.onnx"
    assert invoke("prune", "--model", exported, "--out", pruned, "--tokenizer", tiny.model, "--prune-heads",
                  '{"0": [1]}', "--quiet").exit_code == 0
    # Fails inside the stage, after its output folders were made: more tuning rows than the file has.
    result = invoke("recover", "--reference", tiny.model, "--pruned", pruned, "--data", tiny_holdout_small,
                    "--tuning-samples", "5000", "--max-length", "32", "--no-cache", "--out",
                    tmp_path / "new" / "deeper" / "r.onnx")
    assert_clean_failure(result, "recovery needs at least")
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_removes_the_folders_it_made(tiny, tiny_holdout_small, tmp_path, monkeypatch):
    """The same rule for release folders: run (and engines and collect, through the same lock)."""
    from pipeline.errors import ArtifactError
    from pipeline.stages import export

    def fails(*args, **kwargs):
        raise ArtifactError("the export failed on purpose")

    monkeypatch.setattr(export, "run", fails)
    result = invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out",
                    tmp_path / "new" / "deeper" / "release", "--no-cache")
    assert_clean_failure(result, "the export failed on purpose")
    assert not (tmp_path / "new").exists()


def test_an_out_that_cannot_be_made_is_one_line(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for args in (("export", "--model", tiny.model), ("build", "--model", blocker, "--target", "sm_80")):
        result = invoke(*args, "--out", blocker / "sub" / "m.out")
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert_clean_failure(invoke("export", "--model", tiny.model, "--out", folder, "--overwrite"),
                         "a-folder is a folder; pass a file path")


def test_an_existing_output_is_replaced_only_with_overwrite(tiny, tiny_holdout_small, exported, tmp_path):
    rows = ("--calibration", tiny_holdout_small, "--tokenizer", tiny.model, "--samples", "32", "--max-length", "32")
    out = tmp_path / "int8.onnx"
    args = ("quantize", "--model", exported, *rows, "--tuning-samples", "0", "--out", out, "--quiet")
    assert invoke(*args).exit_code == 0
    out.write_bytes(b"an older file")
    assert_clean_failure(invoke(*args), "int8.onnx already exists", "--overwrite")
    assert out.read_bytes() == b"an older file"
    assert invoke(*args, "--overwrite").exit_code == 0 and out.read_bytes() != b"an older file"

    # A file the stage writes beside --out counts too: a plan left from another prune.
    pruned = tmp_path / "p.onnx"
    plan = tmp_path / "p.plan.json"
    plan.write_text("{}")
    prune = ("prune", "--model", exported, *rows, "--ffn", "0.25", "--out", pruned, "--quiet")
    assert_clean_failure(invoke(*prune), "p.plan.json already exists", "--overwrite", out=pruned)
    assert plan.read_text() == "{}"
    assert invoke(*prune, "--overwrite").exit_code == 0 and json.loads(plan.read_text())["layers"]


def test_collect_and_engines_hold_the_release_lock(tiny, tiny_holdout_small, tmp_path):
    """Two writers to one --out cannot interleave: while a run, collect or engines holds a folder,
    another collect or engines into it is refused at once, naming the holder."""
    from pipeline.run.lock import release_lock

    release = tmp_path / "release"
    assert invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", release,
                  "--quiet").exit_code == 0
    out = tmp_path / "shipped"
    with release_lock(out):
        assert_clean_failure(invoke("collect", release, "--out", out), "being written by another run")
        assert_clean_failure(invoke("engines", release, "--target", "any", "--out", out),
                             "being written by another run")
        assert not out.exists()
    assert invoke("collect", release, "--out", out, "--quiet").exit_code == 0


def test_an_engine_build_record_must_describe_the_engine(tiny, tiny_holdout_small, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine bytes")
    record = tmp_path / "model.engine.json"
    args = ("validate", "--reference", tiny.model, "--artifact", engine, "--data", tiny_holdout_small, "--no-cache")
    record.write_text("{not json")
    assert_clean_failure(invoke(*args), "model.engine.json is not one shipyard build wrote")
    record.write_text(json.dumps({"precision": "int8", "kind": "int8", "sha256": "0" * 64}))
    assert_clean_failure(invoke(*args), "is not the one its build record model.engine.json describes")


def test_only_onnx_runtime_s_refusals_make_a_graph_unsupported(exported, monkeypatch):
    """prove_runs says "does not run in ONNX Runtime" for what ONNX Runtime raises about a graph;
    running out of memory is not that, and keeps its type (and so the CLI's internal-error exit)."""
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph

    from pipeline.graph.proof import GraphCheckError, prove_runs

    def refuses(error):
        def session(*args, **kwargs):
            raise error
        return session

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuses(InvalidGraph("a node ONNX Runtime refuses")))
    with pytest.raises(GraphCheckError, match="does not run in ONNX Runtime"):
        prove_runs(exported, "test")
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuses(MemoryError()))
    with pytest.raises(MemoryError):
        prove_runs(exported, "test")


def test_a_tokenizer_failure_is_called_a_long_question_only_when_it_is_one(tiny):
    from calibration.encode import Encoder, load_tokenizer
    from calibration.errors import DataError
    from calibration.sampling import Columns

    columns = Columns("question", "context")
    encoder = Encoder(load_tokenizer(tiny.model, "question-context"), columns, 16, "longest", "question-context")
    with pytest.raises(DataError, match="a question is longer than max_length 16"):
        encoder.encode([{"question": "why " * 40, "context": "because"}])

    class Broken:
        is_fast = True

        def __call__(self, *args, **kwargs):
            raise Exception("the tokenizer's own failure")  # what tokenizers raises: a plain Exception

    with pytest.raises(Exception, match="the tokenizer's own failure") as raised:
        Encoder(Broken(), columns, 16, "longest", "question-context").encode([{"question": "q", "context": "c"}])
    assert not isinstance(raised.value, DataError)
    assert np.array(encoder.encode([{"question": "q", "context": "c"}])["input_ids"]).shape[0] == 1
