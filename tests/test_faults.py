"""The fault and bad-input suite: every bad input and fault the CLI can meet, and for each the
exit code, one line naming the thing and the fix (no traceback), and nothing left behind or
claimed falsely. Exit codes: 2 bad input or environment, 3 internal error, 130 interrupted,
1 a gate (or `verify`) failed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import invoke, merged, write_recipe

from pipeline.cli import cli


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
    result = invoke("export", "--model", tmp_path / "nope", "--out", out)
    assert_clean_failure(result, "model folder", "not found", out=out)


def test_folder_without_tokenizer(model_copy, tmp_path):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (model_copy / name).unlink(missing_ok=True)
    out = tmp_path / "m.onnx"
    result = invoke("export", "--model", model_copy, "--out", out)
    assert_clean_failure(result, "has no tokenizer", "save_pretrained", out=out)


def test_model_type_not_bert_family(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m.onnx"
    result = invoke("export", "--model", model_copy, "--out", out)
    assert_clean_failure(result, "'gpt2'", "a family Shipyard does not know", out=out)


def test_unknown_task(tiny, tmp_path):
    result = invoke("export", "--model", tiny.model, "--out", tmp_path / "m.onnx", "--task", "translation")
    assert result.exit_code == 2 and "translation" in result.output and "Traceback" not in result.output
    recipe = write_recipe(tmp_path, tiny.model, tmp_path / "d.csv")
    result = invoke("run", recipe, "--set", "model.task=translation", "--out", tmp_path / "r")
    assert_clean_failure(result, "model.task", out=tmp_path / "r")


@pytest.fixture(scope="module")
def onnx_file(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert invoke("export", "--model", tiny.model, "--out", out, "--quiet").exit_code == 0
    return out


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_onnx(onnx_file, tiny, tiny_holdout_small, tmp_path, damage):
    broken = tmp_path / "broken.onnx"
    data = onnx_file.read_bytes()
    broken.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"not an onnx model")
    out = tmp_path / "q.onnx"
    result = invoke("quantize", "--model", broken, "--out", out, "--format", "cpu")
    assert_clean_failure(result, "broken.onnx", "truncated or corrupt", out=out)
    result = invoke("validate", "--reference", tiny.model, "--artifact", broken, "--data", tiny_holdout_small)
    assert_clean_failure(result, "truncated or corrupt")


def test_data_missing_empty_or_without_column(tiny, onnx_file, tiny_holdout_small, tmp_path):
    base = ["validate", "--reference", tiny.model, "--artifact", onnx_file]
    assert_clean_failure(invoke(*base, "--data", tmp_path / "none.csv"), "none.csv", "not found")
    (tmp_path / "empty.jsonl").write_text("")
    assert_clean_failure(invoke(*base, "--data", tmp_path / "empty.jsonl"), "empty.jsonl", "is empty")
    assert_clean_failure(invoke(*base, "--data", tiny_holdout_small, "--text-column", "tweet"),
                         "no column 'tweet'", "columns: text, sentiment")


def test_labels_unknown_to_the_model(tiny, onnx_file, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": lab}) + "\n"
                            for i, lab in enumerate(["positive", "furious", "neutral"])))
    result = invoke("validate", "--reference", tiny.model, "--artifact", onnx_file, "--data", data,
                      "--label-column", "label")
    assert_clean_failure(result, "['furious']", "id2label")


def test_fewer_calibration_rows_than_asked(tiny, tiny_holdout_small, tmp_path):
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small)
    out = tmp_path / "release"
    result = invoke("run", recipe, "--out", out, "--set", "data.calibration.samples=5000")
    assert_clean_failure(result, "calibration asks for 5000 rows", out=out)


def test_output_folder_not_writable(tiny, tiny_holdout_small, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = invoke("export", "--model", tiny.model, "--out", blocker / "sub" / "m.onnx")
    assert_clean_failure(result, "not writable", "--out")
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small)
    result = invoke("run", recipe, "--out", blocker / "release")
    assert_clean_failure(result, "not writable")


def test_recipe_unknown_key_and_wrong_type(tiny, tiny_holdout_small, tmp_path):
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, stages={"quantize": {"formats": ["qdq"], "bits": 4}})
    assert_clean_failure(invoke("run", recipe, "--out", tmp_path / "r"), "stages.quantize.bits", "unknown key")
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, stages={"quantize": {"formats": "int8"}})
    assert_clean_failure(invoke("run", recipe, "--out", tmp_path / "r"), "stages.quantize.formats")


def test_quantize_without_calibration_data(onnx_file, tmp_path):
    out = tmp_path / "q.onnx"
    assert_clean_failure(invoke("quantize", "--model", onnx_file, "--out", out),
                         "--calibration", out=out)


# --- faults: the disk, signals, locks, damaged files, data the tool did not make --------------

def quick_recipe(folder: Path, model: Path, data: Path, /, **sections) -> Path:
    """Export and validate only, on few rows: a whole run in seconds."""
    quick = {"stages": {"quantize": {"enabled": False}},
             "data": {"calibration": {"samples": 32}, "tuning_samples": 32, "evaluation": {"samples": 64},
                      "max_length": 32}}
    return write_recipe(folder, model, data, **merged(quick, sections))


def leftovers(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.*.partial"))


def test_output_folder_that_cannot_be_created(tiny):
    out = Path("/proc/nope/x.onnx")
    assert_clean_failure(invoke("export", "--model", tiny.model, "--out", out), "/proc", "not writable", "--out")


def test_disk_full_mid_write_leaves_nothing(tiny, tiny_holdout_small, tmp_path, monkeypatch):
    import errno

    import pipeline.release.manifest

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline.release.manifest, "write_json", full)  # the manifest, the run's last write
    out = tmp_path / "release"
    result = invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", out, "--no-cache")
    assert_clean_failure(result, "No space left on device writing", "free some space", out=out)


def test_internal_error_exits_3_with_the_traceback_in_a_named_log(tiny, tiny_holdout_small, tmp_path, monkeypatch):
    import pipeline.stages.export

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(pipeline.stages.export, "run", broken)
    out = tmp_path / "release"
    result = invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", out, "--no-cache")
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "internal error (RuntimeError: simulated bug)" in lines[0], result.output
    log = Path(lines[0].rsplit("full traceback in ", 1)[1])
    assert "Traceback" in log.read_text() and "simulated bug" in log.read_text()
    assert "Traceback" not in result.output and not out.exists() and not leftovers(out)


def test_interrupt_exits_130_and_removes_partial_outputs(tiny, tiny_holdout_small, tmp_path, monkeypatch):
    import pipeline.stages.export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.stages.export, "run", interrupted)
    out = tmp_path / "release"
    result = invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", out, "--no-cache")
    assert result.exit_code == 130 and "interrupted" in result.output
    assert not out.exists() and not leftovers(out)


def _shipyard(*args, **kwargs) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("shipyard")
    return subprocess.Popen([str(exe), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def _wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_sigterm_mid_stage_exits_130_and_leaves_nothing(tiny, tiny_holdout_small, tmp_path):
    out = tmp_path / "release"
    proc = _shipyard("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", out, "--no-cache",
                     "--quiet")
    # The run is inside its stages once its partial folder exists. Signal it then, not later: the
    # small test model finishes a quick run in about two seconds, and a SIGTERM that lands while
    # Python is shutting down (its handlers already reset) kills the process with -15 instead.
    _wait_for(lambda: leftovers(out))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().startswith("error: interrupted") and "Traceback" not in err
    assert not out.exists() and not leftovers(out)


@pytest.mark.parametrize("signalled, code", [([signal.SIGTERM], 130), ([], 3)])
def test_a_signal_inside_a_library_import_is_an_interrupt_not_a_crash(tmp_path, monkeypatch, signalled, code):
    """SIGTERM landing while a C extension initialises (seen: onnxruntime's, mid-export) comes out
    of the import as ImportError("initialization failed"): still exit 130, not an internal error."""
    import pipeline.cli.group as cli_module
    import pipeline.run.standalone as standalone

    def export_interrupted(*args, **kwargs):
        raise ImportError("initialization failed")

    monkeypatch.setattr(cli_module, "_SIGNALLED", list(signalled))
    monkeypatch.setattr(standalone, "export_and_check", export_interrupted)
    result = CliRunner().invoke(cli, ["export", "--model", str(tmp_path), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == code, result.output
    assert result.output.startswith("error: interrupted" if code == 130 else "error: internal error")


def test_nan_in_the_reference_model_is_bad_input(model_copy, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model_copy / "model.safetensors"))
    weights["classifier.bias"] = torch.full_like(weights["classifier.bias"], float("nan"))
    save_file(weights, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("export", "--model", model_copy, "--out", out), "NaN or Inf outputs", out=out)


def test_nan_in_an_artifact_fails_its_gate(tiny, onnx_file, tiny_holdout_small, tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file))
    last = next(n for n in model.graph.node if "logits" in n.output)
    weights = {i.name: i for i in model.graph.initializer}
    name = next(i for i in last.input if i in weights)
    weights[name].CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(weights[name]), np.nan), name))
    broken = tmp_path / "nan.onnx"
    onnx.save(model, str(broken))
    result = invoke("validate", "--reference", tiny.model, "--artifact", broken, "--data", tiny_holdout_small,
                      "--samples", 40)
    assert result.exit_code == 1 and "40 of 40 rows have NaN or Inf outputs" in result.output, result.output


def test_texts_longer_than_the_model_allows(tiny, onnx_file, model_copy, tmp_path):
    long = tmp_path / "long.csv"
    long.write_text("text\n" + "".join(" ".join(f"word{i}" for i in range(n)) + "\n" for n in (900, 1500, 3)))
    result = invoke("validate", "--reference", tiny.model, "--artifact", onnx_file, "--data", long,
                      "--max-length", 512)
    assert result.exit_code == 0, result.output  # truncated to the model's 512 positions, as PyTorch does
    config = json.loads((model_copy / "config.json").read_text())
    config["max_position_embeddings"] = 128
    (model_copy / "config.json").write_text(json.dumps(config))
    result = invoke("validate", "--reference", model_copy, "--artifact", onnx_file, "--data", long,
                      "--max-length", 512)
    assert_clean_failure(result, "--max-length 512 is longer than model", "128 positions", "set it to 128 or less")


def test_non_utf8_csv_names_the_byte_and_the_encoding_option(tiny, onnx_file, tmp_path):
    data = tmp_path / "latin1.csv"
    data.write_bytes(b"text,sentiment\n" + "".join(f"caf\xe9 number {i},neutral\n" for i in range(20)).encode("latin-1"))
    base = ["validate", "--reference", tiny.model, "--artifact", onnx_file, "--data", data]
    assert_clean_failure(invoke(*base), "byte 0xe9", "not valid UTF-8", "--encoding")
    assert invoke(*base, "--encoding", "latin-1").exit_code == 0
    assert_clean_failure(invoke(*base, "--encoding", "klingon"), "unknown encoding 'klingon'")


def test_evaluation_split_left_empty_by_sampling(tiny, tiny_holdout_small, tmp_path):
    out = tmp_path / "release"
    recipe = quick_recipe(tmp_path, tiny.model, tiny_holdout_small)
    result = invoke("run", recipe, "--out", out, "--set", "data.calibration.samples=600",
                      "--set", "data.tuning_samples=90")
    assert_clean_failure(result, "evaluation (after the calibration and tuning rows) asks for 64 rows", out=out)


def test_pickle_weights_need_allow_pickle(model_copy, tmp_path):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(model_copy / "model.safetensors")), model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("export", "--model", model_copy, "--out", out),
                         "only pickle weights", "--allow-pickle", out=out)
    assert invoke("export", "--model", model_copy, "--out", out, "--allow-pickle", "--quiet").exit_code == 0


def test_truncated_weights_name_the_file(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    out = tmp_path / "m.onnx"
    assert_clean_failure(invoke("export", "--model", model_copy, "--out", out),
                         "model.safetensors are truncated or corrupt", out=out)


def test_corrupt_cached_demo_model_is_made_again(tiny, tmp_path, monkeypatch):
    """A demo cache whose weights were truncated (a killed copy, a full disk) is not trusted."""
    import shutil

    from conftest import TINY

    import pipeline.run.demo

    home = tmp_path / "demo"
    shutil.copytree(tiny.model.parent, home, symlinks=True)
    weights = home / "minilm-tweets" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    recipe = quick_recipe(tmp_path, home / "minilm-tweets", home / "tweets-holdout.csv")
    assert_clean_failure(invoke("run", recipe, "--out", tmp_path / "r"), "truncated or corrupt",
                         "demo prepare --force")
    fitted = []

    def fine_tune(out_dir, rows, **kwargs):  # stands in for the 40-second fine-tune
        fitted.append(out_dir)
        shutil.copytree(tiny.model, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(pipeline.run.demo, "fine_tune", fine_tune)
    pipeline.run.demo.prepare_demo(home, **TINY)
    assert len(fitted) == 1 and weights.read_bytes() == (tiny.model / "model.safetensors").read_bytes()
    pipeline.run.demo.prepare_demo(home, **TINY)
    assert len(fitted) == 1  # intact now: reused


def hold_lock(out: Path, seconds: float, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """Another process (run under `prefix`, e.g. `unshare`) holding the release folder's lock for `seconds`."""
    holder = subprocess.Popen([*prefix, sys.executable, "-c", (
        "import time\nfrom pipeline.run.lock import release_lock\n"
        f"with release_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep({seconds})")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def wait_until_free(lock: Path) -> None:
    """Wait until the process in another namespace that held `lock` is gone: `unshare`'s child is
    killed (with --kill-child) after `unshare` itself, so it can outlive `wait()` by a moment."""
    from pipeline.run.lock import try_hold

    for _ in range(200):
        fd = try_hold(lock)
        if fd is not None:
            os.close(fd)  # free: the file stays for the code under test to take and remove
            return
        time.sleep(0.05)
    raise AssertionError(f"{lock} is still held 10 s after its holder was killed")


def other_pid_namespace() -> tuple[str, ...]:
    """A command prefix that runs a process in a new PID namespace, as a container does."""
    prefix = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child")
    try:
        subprocess.run([*prefix, "true"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("unshare cannot make a user and PID namespace on this machine (util-linux, "
                    "kernel.unprivileged_userns_clone)")
    return prefix


def test_a_live_run_holds_the_folder_and_a_dead_one_does_not(tiny, tiny_holdout_small, tmp_path):
    out = tmp_path / "release"
    holder = hold_lock(out, 600)
    recipe = quick_recipe(tmp_path, tiny.model, tiny_holdout_small)
    result = invoke("run", recipe, "--out", out)
    assert_clean_failure(result, "is being written by another run", f"pid {holder.pid}", "--wait")
    assert not out.exists() and [p.name for p in tmp_path.glob(".release*")] == [".release.lock"]  # the holder's
    holder.kill()  # SIGKILL: the kernel frees the lock; the owner file stays behind, stale
    holder.wait()
    result = invoke("run", recipe, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output


def test_wait_takes_the_folder_when_the_holder_finishes(tiny, tiny_holdout_small, tmp_path):
    out = tmp_path / "release"
    holder = hold_lock(out, 3)
    result = invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", out, "--wait", "--quiet")
    assert result.exit_code == 0 and holder.wait() == 0, result.output


def test_a_folder_named_through_a_symlink_meets_the_same_lock(tiny, tiny_holdout_small, tmp_path):
    """A run into `link/release`, `link` a symlink to the folder a live run (in another PID
    namespace, as a container's is) writes into, exits 2 naming the holder, and leaves the
    holder's lock and partial outputs alone."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    holder = hold_lock(real / "release", 600, other_pid_namespace())
    try:
        busy = tmp_path / "real" / ".release.abcd1234.partial"  # the holder's work in progress
        busy.mkdir()
        recipe = quick_recipe(tmp_path, tiny.model, tiny_holdout_small)
        result = invoke("run", recipe, "--out", tmp_path / "link" / "release")
        assert_clean_failure(result, "is being written by another run", "pid 1 on", "--wait")
        assert busy.exists() and (real / ".release.lock").exists()
    finally:
        holder.kill()
        holder.wait()
    wait_until_free(real / ".release.lock")
    result = invoke("run", recipe, "--out", tmp_path / "link" / "release", "--quiet")
    assert result.exit_code == 0, result.output
    assert not busy.exists() and (real / "release" / "manifest.json").exists()
    assert sorted(p.name for p in real.iterdir()) == ["release"]  # the lock file went with its run


def test_a_symlinked_release_folder_meets_the_same_lock(tiny, tiny_holdout_small, tmp_path):
    """`--out alias`, alias a symlink to the release folder itself, is the folder's lock too."""
    (tmp_path / "release").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "release", target_is_directory=True)
    holder = hold_lock(tmp_path / "release", 600)
    try:
        result = invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out",
                        tmp_path / "alias", "--overwrite")
        assert_clean_failure(result, f"pid {holder.pid}", "--wait")
    finally:
        holder.kill()
        holder.wait()


def test_cache_partials_are_removed_only_when_their_writer_is_gone(tmp_path):
    """A half-written cache entry of a live writer in another PID namespace survives the sweep a
    run makes when it opens the cache; once the writer is killed, the next sweep removes it."""
    from pipeline.run.cache import StageCache

    writer = subprocess.Popen([*other_pid_namespace(), sys.executable, "-c", (
        "import time\nfrom pathlib import Path\nfrom pipeline.run.cache import StageCache\n"
        f"cache = StageCache.at(Path({str(tmp_path)!r}))\n"
        "tmp, lock, fd = cache._partial('f' * 64)\n(tmp / 'model.onnx').write_bytes(b'half')\n"
        "print(tmp, flush=True)\ntime.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        partial = Path(writer.stdout.readline().strip())
        assert partial.is_dir() and partial.parent == tmp_path / "stages"
        StageCache.at(tmp_path)
        assert (partial / "model.onnx").exists(), "a live writer's entry was swept"
    finally:
        writer.kill()
        writer.wait()
    wait_until_free(partial.with_name(partial.name + ".lock"))
    StageCache.at(tmp_path)
    assert not partial.exists() and not list((tmp_path / "stages").glob(".*.partial*"))


def test_stale_partial_folders_are_removed(tiny, tiny_holdout_small, tmp_path):
    out = tmp_path / "release"
    stale = tmp_path / ".release.k1ll3d00.partial"
    (stale / "model.onnx").parent.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half an onnx file")
    other = tmp_path / ".release-v2.abcdefgh.partial"  # another release's: not ours to remove
    other.mkdir()
    result = invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and other.exists()


def test_the_crash_log_never_follows_a_planted_name(tmp_path, monkeypatch):
    """With Shipyard's log folder unwritable the crash log falls back to the shared temporary
    folder; a symlink planted there under the name a log would have had is not followed."""
    import tempfile

    from pipeline.run.cache import write_crash_log

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("SHIPYARD_CACHE_DIR", str(blocker))
    shared = tmp_path / "tmp"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        (shared / f"shipyard-crash-{stamp}-{pid}.log").symlink_to(victim)
    log = write_crash_log(RuntimeError("boom"), ["shipyard", "run"])
    assert victim.read_text() == "precious"
    assert log.parent == shared and not log.is_symlink() and "RuntimeError: boom" in log.read_text()
    assert log.stat().st_mode & 0o777 == 0o600


def test_cache_folder_not_writable(tiny, tiny_holdout_small, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = tmp_path / "release"
    result = invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", out,
                      "--cache-dir", blocker)
    assert_clean_failure(result, "cache folder", "not writable", "--no-cache", out=out)


def test_bad_signing_keys(tiny, tiny_holdout_small, tmp_path):
    recipe = quick_recipe(tmp_path, tiny.model, tiny_holdout_small)
    out = tmp_path / "release"
    assert_clean_failure(invoke("run", recipe, "--out", out, "--sign-key", tmp_path / "none.pem"),
                         "private key", "not found", out=out)
    (tmp_path / "junk.pem").write_text("not a key")
    assert_clean_failure(invoke("run", recipe, "--out", out, "--sign-key", tmp_path / "junk.pem"),
                         "not a PEM private key", out=out)


@pytest.fixture(scope="module")
def signed_release(tiny, tiny_holdout_small, tmp_path_factory):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = tmp_path_factory.mktemp("signed")
    key = Ed25519PrivateKey.generate()
    (folder / "release.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "release.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    recipe = quick_recipe(folder, tiny.model, tiny_holdout_small, stages={
        "quantize": {"enabled": True, "formats": ["qdq"], "fallback": {"max_nodes": 0}}},
        thresholds={"int8": {"min_agreement": 0.5, "max_metric_drop": 0.5}})
    result = invoke("run", recipe, "--out", folder / "out", "--sign-key", folder / "release.key", "--quiet")
    assert result.exit_code == 0, result.output
    return folder


def test_verify_passes_a_signed_release_and_catches_a_flipped_byte_in_any_file(signed_release):
    out, pub = signed_release / "out", signed_release / "release.pub"
    ok = invoke("verify", out, "--public-key", pub)
    assert ok.exit_code == 0 and "intact" in ok.output, ok.output
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", "manifest.json.sig"}
    assert {r["role"] for r in manifest["files"].values()} == {"artifact", "report", "junit", "tokenizer", "serving"}
    for name in manifest["files"]:
        path = out / name
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            result = invoke("verify", out, "--public-key", pub)
            assert result.exit_code == 1 and f"{name}: " in result.output and "sha256 differs" in result.output, \
                result.output
        finally:
            path.write_bytes(original)


def test_a_file_the_manifest_does_not_list_fails_verify_and_collect(signed_release, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(signed_release / "out", out)
    (out / "notes.txt").write_text("dropped in after the run")
    result = invoke("verify", out)
    assert result.exit_code == 1 and "notes.txt: not listed in the manifest" in result.output, result.output
    merged = tmp_path / "merged"
    assert_clean_failure(invoke("collect", out, "--out", merged), "notes.txt: not listed in the manifest", out=merged)
    (out / "notes.txt").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "role": "file"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("verify", out)
    assert result.exit_code == 1 and "../outside.txt: listed with a path that is absolute or leaves the folder" \
        in result.output, result.output


def test_verify_catches_a_hand_edited_manifest(signed_release, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(signed_release / "out", out)
    pub = signed_release / "release.pub"
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["passed"] = not manifest["passed"]  # the hash-consistent lie only a signature catches
    manifest_path.write_text(json.dumps(manifest, indent=2))
    assert invoke("verify", out).exit_code == 0  # unsigned check: every hash still matches
    result = invoke("verify", out, "--public-key", pub)
    assert result.exit_code == 1 and "manifest.json.sig: does not match manifest.json" in result.output
    del manifest["artifacts"][0]["sha256"]
    manifest_path.write_text(json.dumps(manifest))
    result = invoke("verify", out)
    assert result.exit_code == 1 and "manifest.json: artifacts.0.sha256: Field required" in result.output
    manifest_path.unlink()
    assert invoke("verify", out).exit_code == 1
    assert invoke("verify", tmp_path / "nowhere").exit_code == 2


def test_damaged_cache_entry_is_recomputed_not_trusted(tiny, tiny_holdout_small, tmp_path):
    cache = tmp_path / "cache"
    recipe = quick_recipe(tmp_path, tiny.model, tiny_holdout_small)
    first = invoke("run", recipe, "--out", tmp_path / "a", "--cache-dir", cache, "--quiet")
    assert first.exit_code == 0, first.output
    entry = next(p.parent for p in (cache / "stages").glob("*/model.onnx"))
    onnx_file = entry / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10] + b"0123456789")
    second = invoke("run", recipe, "--out", tmp_path / "b", "--cache-dir", cache, "--quiet")
    assert second.exit_code == 0, second.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["invocation"]["cache"]["damaged_and_recomputed"] == ["export"]
    assert (tmp_path / "b" / "model.onnx").read_bytes() == (tmp_path / "a" / "model.onnx").read_bytes()


# --- errors that name their real cause ------------------------------------------------------------

def test_an_artifact_with_other_outputs_than_the_reference_is_bad_input(tiny, tiny_holdout_small, tmp_path):
    """A graph whose logits have another width (another number of labels: not this model's) is
    exit 2 naming the output and both shapes, not an internal error."""
    import onnx
    from onnx import helper

    exported = tmp_path / "model.onnx"
    assert invoke("export", "--model", tiny.model, "--out", exported, "--quiet").exit_code == 0
    model = onnx.load(str(exported))
    producer = next(n for n in model.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_of_the_model"
    model.graph.node.append(helper.make_node("Concat", ["logits_of_the_model", "logits_of_the_model"], ["logits"],
                                             axis=-1))
    model.graph.output[0].type.tensor_type.shape.dim[-1].dim_param = "labels"
    other = tmp_path / "three-labels.onnx"
    onnx.save(model, str(other))
    result = invoke("validate", "--reference", tiny.model, "--artifact", other, "--data", tiny_holdout_small,
                    "--samples", "32", "--max-length", "32", "--no-cache", "--report", tmp_path / "report.json")
    assert_clean_failure(result, "output logits has shape", "where the reference's has", "--reference")
    assert not (tmp_path / "report.json").exists()


def test_a_file_this_user_cannot_read_is_named_as_an_input(tmp_path, monkeypatch):
    """EACCES on a file that exists but is unreadable (model weights, data) says "reading" and the
    fix; on anything else it is an output this user cannot write."""
    from pipeline.cli import group

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    monkeypatch.setattr(group.os, "access", lambda path, mode: False)
    line = group.os_error_message(PermissionError(13, "Permission denied", str(weights)))
    assert line == f"Permission denied reading {weights}; make it readable by this user (chmod, or run as its owner)"
    monkeypatch.undo()
    line = group.os_error_message(PermissionError(13, "Permission denied", str(tmp_path / "out" / "model.onnx")))
    assert "writing" in line and "choose a writable --out" in line


def test_readiness_reports_values_shape_inference_left_untyped(tmp_path):
    """A value shape inference cannot type (an op of an unknown domain) is a named warning, not a
    dtype rule skipped in silence."""
    import onnx
    from onnx import TensorProto, helper

    from pipeline.trt.readiness import check_model_file

    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["hidden"], domain="com.example"), helper.make_node("Relu", ["hidden"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    report = check_model_file(path, "10.15")
    untyped = [f for f in report.warnings if f.rule == "types-unknown"]
    assert len(untyped) == 1 and "hidden" in untyped[0].message


def test_the_engine_benchmark_refuses_a_release_that_does_not_verify(tiny, tiny_holdout_small, tmp_path):
    """bench/engines.py deserializes engines: only from a release that verifies."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from engines import engines_in
    except ImportError as err:  # torch or the bench helpers missing would be a broken checkout
        raise AssertionError(err) from None
    finally:
        sys.path.pop(0)
    out = tmp_path / "release"
    assert invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", out, "--quiet").exit_code == 0
    assert engines_in([out])[0] == []  # verified, and no engine in it
    (out / "planted.engine").write_bytes(b"code")
    with pytest.raises(SystemExit, match="planted.engine: not listed"):
        engines_in([out])


def test_validate_of_an_engine_that_is_missing_or_unrecorded(tiny, tiny_holdout_small, tmp_path):
    args = ["validate", "--reference", tiny.model, "--data", tiny_holdout_small, "--no-cache"]
    assert_clean_failure(invoke(*args, "--artifact", tmp_path / "gone.engine"), "engine", "not found", "shipyard build")
    (tmp_path / "loose.engine").write_bytes(b"an engine from somewhere")
    assert_clean_failure(invoke(*args, "--artifact", tmp_path / "loose.engine"), "has no build record",
                         "loose.engine.json")


def test_cache_commands_on_a_cache_folder_that_is_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for command in ("ls", "prune"):
        assert_clean_failure(invoke("cache", command, "--cache-dir", blocker), "cache folder", "not writable")


def test_a_bad_cache_size_cap_stops_a_run_before_any_work(tiny, tiny_holdout_small, tmp_path, monkeypatch):
    monkeypatch.setenv("SHIPYARD_CACHE_MAX_SIZE", "-5GB")
    out = tmp_path / "release"
    assert_clean_failure(invoke("run", quick_recipe(tmp_path, tiny.model, tiny_holdout_small), "--out", out),
                         "SHIPYARD_CACHE_MAX_SIZE '-5GB' is not a size", "20GB", out=out)
