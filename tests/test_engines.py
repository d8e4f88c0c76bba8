"""The TensorRT path before its first GPU: everything about engines that can be decided or run on CPU.

- the runner's batch splitting and padding over optimization profiles, run end to end with a fake
  engine whose `_execute` is ONNX Runtime on the same graph;
- the build plan's decisions (TF32 off for fp32, static DLA profiles, the parser's DLA flag) and the
  timing-cache handling, with a fake builder config;
- the TensorRT version of each target and the engine-host checks;
- `shipyard engines` from a release folder: every refusal, and a whole build-gate-collect round
  in which the "engine" is computed by ONNX Runtime (the tests say so where they do it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PROFILE, write_recipe

from pipeline.cli import cli
from pipeline.errors import ArtifactError, ShipyardError
from pipeline.parity.engine import (
    ProfileRange,
    TrtRunner,
    describe_engine,
    engine_bytes,
    pad_batch,
    plan_chunks,
    trim_output,
)
from pipeline.parity.runners import OrtRunner
from pipeline.recipe import ProfileSpec, Range, TargetSpec
from pipeline.stages import build


def _static(batch: int, sequence: int) -> ProfileSpec:
    return ProfileSpec(batch=Range(min=batch, opt=batch, max=batch),
                       sequence=Range(min=sequence, opt=sequence, max=sequence))


# --- splitting batches over profiles -------------------------------------------------------------

def test_a_batch_larger_than_every_profile_runs_in_slices():
    orin = [ProfileRange(batch=(1, 8), sequence=(8, 128))]  # the demo's orin-fp16 profile
    chunks = plan_chunks(orin, rows=32, sequence=64)
    assert [(c.start, c.stop, c.rows, c.sequence) for c in chunks] == [
        (0, 8, 8, 64), (8, 16, 8, 64), (16, 24, 8, 64), (24, 32, 8, 64)]
    tail = plan_chunks(orin, rows=19, sequence=64)
    assert [(c.start, c.stop) for c in tail] == [(0, 8), (8, 16), (16, 19)]


def test_short_sequences_and_short_slices_are_padded_to_the_profile_minimum():
    profiles = [ProfileRange(batch=(4, 4), sequence=(64, 64))]  # a static (DLA) profile
    chunks = plan_chunks(profiles, rows=10, sequence=20)
    assert [(c.start, c.stop, c.rows, c.sequence) for c in chunks] == [
        (0, 4, 4, 64), (4, 8, 4, 64), (8, 10, 4, 64)]


def test_the_profile_needing_fewest_runs_then_least_padding_wins():
    latency = ProfileRange(batch=(1, 8), sequence=(8, 128))
    throughput = ProfileRange(batch=(8, 64), sequence=(8, 128))
    assert {c.profile for c in plan_chunks([latency, throughput], rows=32, sequence=64)} == {1}
    assert {c.profile for c in plan_chunks([latency, throughput], rows=3, sequence=64)} == {0}  # no row padding
    long_only = ProfileRange(batch=(1, 64), sequence=(128, 256))
    assert plan_chunks([latency, long_only], rows=8, sequence=200)[0].profile == 1


def test_a_sequence_longer_than_every_profile_is_refused_with_the_fix():
    with pytest.raises(ArtifactError, match="longer than every optimization profile accepts \\(at most 128\\)"):
        plan_chunks([ProfileRange(batch=(1, 8), sequence=(8, 128))], rows=2, sequence=256)


def test_padding_masks_new_positions_and_trim_drops_them():
    batch = {"input_ids": np.array([[101, 7, 102]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    padded = pad_batch(batch, rows=3, sequence=5)
    assert padded["input_ids"].shape == (3, 5)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0, 0]] * 3  # repeated rows, masked positions
    per_token = np.arange(3 * 5 * 2).reshape(3, 5, 2)
    assert trim_output(per_token, (-1, -1, 2), rows=1, sequence=3).shape == (1, 3, 2)
    assert trim_output(np.zeros((3, 4)), (-1, 4), rows=1, sequence=3).shape == (1, 4)  # logits: rows only


class FakeEngine:
    """The parts of `tensorrt.ICudaEngine` the runner reads, for a two-profile engine."""

    def __init__(self, inputs, outputs, profiles):
        self._inputs, self._outputs, self._profiles = inputs, outputs, profiles
        self.num_io_tensors = len(inputs) + len(outputs)
        self.num_optimization_profiles = len(profiles)

    def get_tensor_name(self, i):
        return (self._inputs + list(self._outputs))[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self._inputs else "OUTPUT"

    def get_tensor_shape(self, name):
        return self._outputs.get(name, (-1, -1))

    def get_tensor_profile_shape(self, name, index):
        (bmin, bmax), (smin, smax) = self._profiles[index]
        return (bmin, smin), (bmax, smax), (bmax, smax)


class OrtBackedTrtRunner(TrtRunner):
    """TrtRunner's own batching, with each engine run computed by ONNX Runtime on the typed graph
    and checked against the chosen profile, as TensorRT would refuse a shape outside it."""

    def __init__(self, onnx_path, engine):
        super().__init__(Path("fake.engine"))
        self._ort = OrtRunner(onnx_path)
        self._io = describe_engine(engine, "INPUT")
        self._engine = engine
        self.calls = []

    def _execute(self, profile, feed):
        rows, sequence = next(iter(feed.values())).shape
        low, high = self._io.profiles[profile].batch, self._io.profiles[profile].sequence
        assert low[0] <= rows <= low[1] and high[0] <= sequence <= high[1], (profile, rows, sequence)
        self.calls.append((profile, rows, sequence))
        return self._ort.infer(feed)


@pytest.mark.slow
def test_runner_splits_and_pads_yet_matches_one_unsplit_run(tiny_release):
    """Item 1: the orin profile (max batch 8, min sequence 16) on 32-row batches of 12 tokens."""
    onnx_path = tiny_release.out / "model.onnx"
    reference = OrtRunner(onnx_path)
    inputs = reference.input_names
    engine = FakeEngine(inputs, {"logits": (-1, 3)}, [((1, 8), (16, 128))])
    runner = OrtBackedTrtRunner(onnx_path, engine)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1000, 5000, (32, 12)), "attention_mask": np.ones((32, 12), np.int64),
             "token_type_ids": np.zeros((32, 12), np.int64)}
    batch["attention_mask"][5, 9:] = 0  # a row with its own padding
    split = runner.infer(batch)["logits"]
    whole = reference.infer(batch)["logits"]
    assert runner.calls == [(0, 8, 16)] * 4
    np.testing.assert_allclose(split, whole, atol=1e-4)
    assert (split.argmax(1) == whole.argmax(1)).all()


# --- the build plan ------------------------------------------------------------------------------

@pytest.mark.slow
def test_fp32_targets_clear_tf32_and_dla_targets_are_static(tiny_release):
    onnx_path = tiny_release.out / "model.onnx"
    fp32 = build.plan_build(TargetSpec(name="a", arch="sm_80", precision="fp32", profiles=[ProfileSpec(**PROFILE)]),
                            onnx_path)
    assert fp32.clear_flags == ["TF32"] and fp32.parser_flags == []
    fp16 = build.plan_build(TargetSpec(name="b", arch="sm_80", precision="fp16", profiles=[ProfileSpec(**PROFILE)]),
                            onnx_path)
    assert fp16.clear_flags == []
    dla = build.plan_build(TargetSpec(name="c", arch="sm_87", precision="fp16", dla_core=0,
                                      profiles=[_static(4, 64)]), onnx_path)
    assert dla.parser_flags == ["ADJUST_FOR_DLA"] and "GPU_FALLBACK" in dla.flags
    assert dla.profiles[0]["input_ids"] == [[4, 64], [4, 64], [4, 64]]
    assert dla.trt_version == "10.3"


def test_dla_targets_with_dynamic_profiles_are_refused():
    with pytest.raises(ValueError, match="DLA runs static shapes only; profile 0 batch is 1/8/32"):
        TargetSpec(name="c", arch="sm_87", precision="fp16", dla_core=0, profiles=[ProfileSpec(**PROFILE)])


class FakeCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return self.data


class FakeConfig:
    """`IBuilderConfig`'s timing-cache calls: refuses caches made elsewhere, may keep none."""

    def __init__(self, accepts_existing: bool, keeps: bytes | None):
        self.accepts_existing, self.keeps, self.attached = accepts_existing, keeps, []

    def create_timing_cache(self, data: bytes):
        return FakeCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        ok = not cache.data or self.accepts_existing
        if ok:
            self.attached.append(cache.data)
        return ok

    def get_timing_cache(self):
        return None if self.keeps is None else FakeCache(self.keeps)


def test_timing_cache_from_another_device_is_replaced_not_fatal(tmp_path):
    path = tmp_path / "sm_80.cache"
    path.write_bytes(b"from another GPU")
    config = FakeConfig(accepts_existing=False, keeps=b"this GPU")
    status = build.attach_timing_cache(config, path)
    assert status.startswith("mismatch") and config.attached == [b""]
    assert build.save_timing_cache(config, path, status).endswith("saved")
    assert path.read_bytes() == b"this GPU"


def test_no_timing_cache_from_the_builder_leaves_the_file_alone(tmp_path):
    path = tmp_path / "sm_80.cache"
    path.write_bytes(b"good")
    config = FakeConfig(accepts_existing=True, keeps=None)
    status = build.attach_timing_cache(config, path)
    assert status == "loaded" and config.attached == [b"good"]
    assert "not saved" in build.save_timing_cache(config, path, status)
    assert path.read_bytes() == b"good"
    fresh = tmp_path / "new.cache"
    assert build.attach_timing_cache(FakeConfig(True, b"x"), fresh) == "new"
    assert build.attach_timing_cache(FakeConfig(True, b"x"), None) == "none"


# --- TensorRT versions and architectures ----------------------------------------------------------

@pytest.mark.parametrize("arch, trt, local, refused", [
    ("sm_87", None, "10.3.0.30", None),  # JetPack 6
    ("sm_87", None, "10.15.1", "runs TensorRT 10.3 but this is TensorRT 10.15.1"),
    ("sm_87", "10.15", "10.15.1", None),
    ("sm_120", None, "11.5.0", None),  # stages.build.trt_version: 11.5
    ("sm_100", None, "10.3.0", "runs TensorRT 11.5"),
])
def test_engines_are_built_with_the_targets_tensorrt(arch, trt, local, refused):
    target = TargetSpec(name="t", arch=arch, precision="fp16", profiles=[ProfileSpec(**PROFILE)], trt_version=trt)
    env = build.BuildEnvironment(trt_version=local, gpu_name="GPU", arch=arch)
    if refused is None:
        build.check_target_arch(target, env)
    else:
        with pytest.raises(build.BuildUnavailable, match=refused):
            build.check_target_arch(target, env)


def test_blackwell_targets_validate_and_plan(tmp_path):
    targets = [{"name": f"bw-{arch}", "arch": arch, "precision": "fp16", "profiles": [PROFILE]}
               for arch in ("sm_100", "sm_103", "sm_120")]
    # The model is on another machine: recipe validate checks the schema and targets only.
    recipe = write_recipe(tmp_path, tmp_path / "model", tmp_path / "data.csv", targets=targets)
    runner = CliRunner()
    validated = runner.invoke(cli, ["recipe", "validate", str(recipe)])
    assert validated.exit_code == 0 and "is not on this machine: not checked" in validated.output
    plan = json.loads(runner.invoke(cli, ["plan", str(recipe)]).output)
    jobs = {j["target"]: j for j in plan["jobs"]}
    assert jobs["bw-sm_120"]["runs_on"] == ["self-hosted", "gpu", "sm_120"]
    assert jobs["bw-sm_100"]["gpu"].startswith("Blackwell") and jobs["bw-sm_100"]["trt_version"] == "11.5"
    assert jobs["bw-sm_100"]["command"] == "shipyard engines release --target bw-sm_100 --out engines/bw-sm_100"
    assert plan["release"]["command"] == f"shipyard run {recipe} --out release --no-engines"
    assert plan["collect"]["command"].startswith("shipyard collect release engines/*")


def test_targets_default_to_their_platforms_tensorrt(tmp_path):
    targets = [{"name": "orin", "arch": "sm_87", "precision": "fp16", "profiles": [PROFILE]},
               {"name": "a100", "arch": "sm_80", "precision": "fp16", "profiles": [PROFILE]},
               {"name": "pinned", "arch": "sm_87", "precision": "fp16", "profiles": [PROFILE], "trt_version": "10.15"}]
    recipe = write_recipe(tmp_path, tmp_path, tmp_path / "data.csv", targets=targets)
    shown = CliRunner().invoke(cli, ["recipe", "show", str(recipe)])
    assert shown.exit_code == 0
    import yaml

    resolved = {t["name"]: t["trt_version"] for t in yaml.safe_load(shown.output)["targets"]}
    assert resolved == {"orin": "10.3", "a100": "11.5", "pinned": "10.15"}
    unknown = write_recipe(tmp_path, tmp_path, tmp_path / "data.csv",
                           targets=[{**targets[0], "trt_version": "9.0"}])
    result = CliRunner().invoke(cli, ["recipe", "validate", str(unknown)])
    assert result.exit_code == 2 and "no ONNX operator list for TensorRT 9.0" in result.output


@pytest.mark.parametrize("overrides, targets, message", [
    (["--set", "data.max_length=256"], None,
     "target a100: data.max_length 256 is longer than every profile's sequence.max (at most 128)"),
    ([], [{"name": "orin", "arch": "sm_87", "precision": "fp16", "dla_core": 0, "profiles": [PROFILE]}],
     "DLA runs static shapes only"),
])
def test_recipe_validate_refuses_profiles_the_data_cannot_use(tmp_path, overrides, targets, message):
    targets = targets or [{"name": "a100", "arch": "sm_80", "precision": "fp16", "profiles": [PROFILE]}]
    recipe = write_recipe(tmp_path, tmp_path, tmp_path / "d.csv", targets=targets)
    result = CliRunner().invoke(cli, ["recipe", "validate", str(recipe), *overrides])
    assert result.exit_code == 2 and message in result.output, result.output


# --- a run whose engine build fails keeps its CPU artifacts -------------------------------------

def _fake_gpu_host(monkeypatch, trt_version="11.5.0"):
    """Pretend this machine has TensorRT and a GPU of every target's architecture."""
    monkeypatch.setattr(build, "build_environment",
                        lambda: build.BuildEnvironment(trt_version=trt_version, gpu_name="Fake GPU", arch="sm_80"))
    monkeypatch.setattr(build, "check_target_arch", lambda target, env: None)


@pytest.mark.slow
def test_a_failed_engine_build_fails_the_run_with_exit_1_and_keeps_every_cpu_artifact(
        tiny, tiny_holdout_small, tmp_path, monkeypatch):
    _fake_gpu_host(monkeypatch)

    def parser_refuses(plan, out, env):
        raise build.EngineBuildFailed(f"TensorRT {env.trt_version} could not parse {plan.onnx}")

    monkeypatch.setattr(build, "build_engine", parser_refuses)
    target = {"name": "a100", "arch": "sm_80", "precision": "fp16", "profiles": [PROFILE]}
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, targets=[target],
                          stages={"quantize": {"formats": ["qdq"]}})
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    build_stage = next(s for s in manifest["stages"] if s["stage"] == "build[a100]")
    assert not build_stage["passed"] and "could not parse" in build_stage["message"]
    assert manifest["targets"][0]["engine_status"] == "build failed"
    kept = {a["path"] for a in manifest["artifacts"]}
    assert {"model.onnx", "model.int8.qdq.onnx", "model.trt.fp16.onnx"} <= kept
    assert all((out / p).is_file() for p in kept)

    # Phase one of a two-phase release attempts no engine, even on a (fake) GPU host.
    deferred = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--overwrite", "--quiet",
                                        "--no-engines"])
    assert deferred.exit_code == 0, deferred.output
    target = json.loads((out / "manifest.json").read_text())["targets"][0]
    assert target["engine_status"] == "deferred to shipyard engines" and target["engine"] is None
    # Never attempted is not passed: JUnit skips the build case with its reason, the report says so.
    import xml.etree.ElementTree as ET

    case = next(c for c in ET.parse(out / "junit.xml").getroot() if c.get("name") == "build[a100]")
    assert [e.tag for e in case] == ["skipped"] and "deferred to shipyard engines" in case[0].get("message")
    assert "| build[a100] | skipped |" in (out / "report.md").read_text()


# --- shipyard engines RELEASE_DIR -----------------------------------------------------------------

def _engines(*args):
    return CliRunner().invoke(cli, ["engines", *map(str, args)])


@pytest.mark.slow
def test_engines_refuses_what_it_cannot_trust(tiny_release, tmp_path, no_tensorrt):
    release = tiny_release.out
    missing = _engines(tmp_path, "--target", "a100-int8", "--out", tmp_path / "e")
    assert missing.exit_code == 2 and "no manifest.json" in missing.output
    unknown = _engines(release, "--target", "h100", "--out", tmp_path / "e")
    assert unknown.exit_code == 2 and "target 'h100' is not in recipe" in unknown.output
    other = _engines(release, "--target", "a100-int8", "--out", tmp_path / "e", "--set", "thresholds.int8.min_agreement=0")
    assert other.exit_code == 2 and "engines takes only the paths" in other.output
    no_trt = _engines(release, "--target", "a100-int8", "--out", tmp_path / "e")
    assert no_trt.exit_code == 2 and "TensorRT is not installed" in no_trt.output
    tampered = tmp_path / "tampered"
    shutil.copytree(release, tampered)
    with (tampered / "model.trt.int8-fp16.onnx").open("r+b") as f:
        f.seek(200)
        f.write(b"\0")
    damaged = _engines(tampered, "--target", "a100-int8", "--out", tmp_path / "e")
    assert damaged.exit_code == 2 and "model.trt.int8-fp16.onnx: sha256 differs" in damaged.output
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_engines_refuses_another_model_on_the_gpu_host(tiny_release, model_copy, tmp_path, monkeypatch):
    _fake_gpu_host(monkeypatch)
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "shipyard_note": "edited"}))
    result = _engines(tiny_release.out, "--target", "a100-int8", "--out", tmp_path / "e",
                      "--set", f"model.path={model_copy}")
    assert result.exit_code == 2 and "is not the model release" in result.output
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_engines_builds_gates_and_collects_with_the_release(tiny_release, tiny, tiny_holdout_small, tmp_path,
                                                              monkeypatch):
    """The whole second phase on CPU. Only TensorRT is faked: the "engine" file is the typed ONNX's
    bytes and it runs on ONNX Runtime; the verification, gate, manifest and merge are the real ones."""
    _fake_gpu_host(monkeypatch)

    def fake_build(plan, out, env):
        shutil.copyfile(plan.onnx, out)
        from pipeline.artifacts import sha256_file

        return build.EngineRecord(path=str(out), sha256=sha256_file(out), size_bytes=Path(out).stat().st_size,
                                  trt_version=env.trt_version, gpu_name=env.gpu_name, compute_capability=env.arch,
                                  build_seconds=0.0, plan=plan.to_dict(), timing_cache="none")

    monkeypatch.setattr(build, "build_engine", fake_build)
    from pipeline.stages import validate

    host_code = []

    def ort_for(path, fmt=None, host_code_allowed=False, sha256=None):
        """As TrtRunner reads an engine: once, checked against the hash it was given, then those bytes run."""
        host_code.append(host_code_allowed)
        return OrtOnBytes(engine_bytes(path, sha256))

    monkeypatch.setattr(validate, "runner_for", ort_for)
    out = tmp_path / "engines" / "a100-int8"
    result = _engines(tiny_release.out, "--target", "a100-int8", "--out", out)
    assert result.exit_code == 0, result.output
    small = json.loads((out / "manifest.json").read_text())
    assert small["release"]["path"] == str(tiny_release.out.resolve())
    assert [a["path"] for a in small["artifacts"]] == ["engines/a100-int8.engine"]
    assert small["artifacts"][0]["parity"]["samples"] == 400 and small["passed"]
    assert small["targets"][0]["engine"]["plan"]["onnx"] == str(tiny_release.out / "model.trt.int8-fp16.onnx")
    assert not (out / "model.onnx").exists()  # nothing of the release is rebuilt or copied

    merged = tmp_path / "shipped"
    collected = CliRunner().invoke(cli, ["collect", str(tiny_release.out), str(out), "--out", str(merged)])
    assert collected.exit_code == 0, collected.output
    manifest = json.loads((merged / "manifest.json").read_text())
    engines = {t["name"]: t["engine"] for t in manifest["targets"]}
    assert engines["a100-int8"]["path"] == "engines/a100-int8.engine" and engines["orin-fp16"] is None
    assert (merged / "engines" / "a100-int8.engine").is_file() and (merged / "model.int8.qdq.onnx").is_file()
    from pipeline.release.signing import verify_folder

    assert verify_folder(merged) == []
    alone = CliRunner().invoke(cli, ["collect", str(out), "--out", str(tmp_path / "x")])
    assert alone.exit_code == 2 and "which is not among the folders given" in alone.output
    assert host_code == [False]  # built here, but not version-compatible: no host code needed
    check_a_swapped_engine_never_runs(merged, tiny.model, tiny_holdout_small, monkeypatch)
    check_engine_trust(merged, tiny.model, tiny_holdout_small, tmp_path, host_code)


class OrtOnBytes(OrtRunner):
    """ONNX Runtime on the bytes given, as the engine runner deserializes the bytes it checked."""

    def __init__(self, plan: bytes) -> None:
        super().__init__(Path("engine-bytes"))
        self._plan = plan

    def _load(self):
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(self._plan, providers=["CPUExecutionProvider"])
        return self._session


def check_a_swapped_engine_never_runs(merged: Path, model: Path, holdout: Path, monkeypatch) -> None:
    """An engine file replaced after its release was verified, or after it was hashed for the
    gate, is refused (exit 2), not run: another valid graph would otherwise be gated and trusted."""
    from pipeline.release import signing
    from pipeline.run import gating, standalone

    engine = merged / "engines" / "a100-int8.engine"
    verified, other = engine.read_bytes(), (merged / "model.onnx").read_bytes()
    args = ["validate", "--reference", str(model), "--artifact", str(engine), "--data", str(holdout), "--samples",
            "64", "--max-length", "32", "--min-agreement", "0", "--no-cache"]
    assert signing.verify_folder(merged) == []
    assert CliRunner().invoke(cli, args).exit_code == 0

    def trust_then_swap(path, public_key=None):
        trust = signing.engine_trust(path, public_key)
        engine.write_bytes(other)
        return trust

    with monkeypatch.context() as patch:
        patch.setattr(standalone, "engine_trust", trust_then_swap)
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "changed after its release was verified" in result.output, result.output
    engine.write_bytes(verified)

    real_validate = gating.Gating.validate

    def swap_then_validate(self, *args, **kwargs):
        engine.write_bytes(other)
        return real_validate(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(gating.Gating, "validate", swap_then_validate)
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "changed after it was hashed" in result.output, result.output
    engine.write_bytes(verified)


def check_engine_trust(merged: Path, model: Path, holdout: Path, tmp_path: Path, host_code: list) -> None:
    """Host code only for an engine its verified release records as built version-compatible."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pipeline.release.signing import engine_trust, sign_manifest

    engine = merged / "engines" / "a100-int8.engine"
    trust = engine_trust(engine)
    assert not trust.host_code and "built without version compatibility" in trust.reason
    assert trust.record.precision == "int8"

    manifest = json.loads((merged / "manifest.json").read_text())  # the release now claims version compatibility
    target = next(t for t in manifest["targets"] if t["name"] == "a100-int8")
    target["engine"]["plan"]["flags"].append("VERSION_COMPATIBLE")
    (merged / "manifest.json").write_text(json.dumps(manifest))
    trust = engine_trust(engine)
    assert trust.host_code and "--public-key" in trust.reason  # unsigned: integrity, not authorship
    key = Ed25519PrivateKey.generate()
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (tmp_path / "k.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    sign_manifest(merged, tmp_path / "k.pem")
    assert engine_trust(engine, tmp_path / "k.pub").host_code

    other = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "other.pub").write_bytes(other.public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    assert not engine_trust(engine, tmp_path / "other.pub").host_code  # signed by someone else
    loose = tmp_path / "loose.engine"  # the same bytes outside any release
    shutil.copyfile(engine, loose)
    assert engine_trust(loose).reason == "no release manifest.json records it"
    with engine.open("r+b") as f:  # one byte of the engine changed
        f.seek(100)
        f.write(b"\xff")
    trust = engine_trust(engine)
    assert not trust.host_code and "does not verify" in trust.reason and "engines/a100-int8.engine" in trust.reason

    # shipyard validate on an engine no release records says it ran it without host code.
    from pipeline.artifacts import sha256_file

    (tmp_path / "loose.engine.json").write_text(json.dumps({"precision": "int8", "kind": "int8",
                                                            "sha256": sha256_file(loose)}))
    result = CliRunner().invoke(cli, ["validate", "--reference", str(model), "--artifact", str(loose),
                                      "--data", str(holdout), "--samples", "64", "--max-length", "32",
                                      "--min-agreement", "0", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "engine deserialized without host code: no release manifest.json records it" in result.output
    assert host_code[-1] is False


def test_phase_two_prepares_only_what_gating_an_engine_needs(tiny, tiny_holdout_small, tmp_path):
    """`shipyard engines` on a GPU host tokenizes the evaluation rows only and reads no recovery
    data: it needs to know which rows calibration and tuning took, not their tokens."""
    from pipeline.recipe import load_recipe
    from pipeline.run.cache import batches_digest
    from pipeline.run.context import RunInputs

    recipe = load_recipe(write_recipe(tmp_path, tiny.model, tiny_holdout_small))
    full, engines = RunInputs.of(recipe), RunInputs.of(recipe, for_engines=True)
    assert full.prepared.calibration.batches and full.prepared.tuning.batches
    assert engines.prepared.calibration.batches == [] and engines.prepared.tuning.batches == []
    assert engines.prepared.evaluation.fingerprint == full.prepared.evaluation.fingerprint
    assert batches_digest(engines.prepared.evaluation.batches) == batches_digest(full.prepared.evaluation.batches)
    assert engines.gating.batches_digest == full.gating.batches_digest  # so PyTorch's cached outputs are shared
    assert engines.prepared.seen_digests == full.prepared.seen_digests

    recovering = recipe.model_copy(deep=True)
    recovering.stages.prune.enabled = recovering.stages.prune.recover.enabled = True
    recovering.data.training = recipe.data.calibration.model_copy(update={"path": tmp_path / "gone.csv"})
    with pytest.raises(ShipyardError, match="gone.csv"):
        RunInputs.of(recovering)  # a run reads the training data before any stage
    assert RunInputs.of(recovering, for_engines=True).recovery is None
