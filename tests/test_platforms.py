"""The platform table (`pipeline/platforms.py`): presets resolve to their architecture and
TensorRT, what cannot exist is refused in one line naming the real options, and the schema,
the extras, the Dockerfile and `shipyard targets` are read from it."""

import json
from typing import get_args

import pytest
from conftest import PROFILE, invoke, write_recipe
from test_faults import assert_clean_failure

from pipeline.platforms import ARCHITECTURES, PLATFORMS, TRT_RELEASES, Arch, shipped_trt_versions


def _target(**fields):
    return {"name": "t", "precision": "fp16", "profiles": [PROFILE], **fields}


@pytest.mark.parametrize("platform, arch, trt", [
    ("jetson-orin-jp6", "sm_87", "10.3"), ("jetson-orin-jp7.2", "sm_87", "10.16"), ("h100", "sm_90", "11.5"),
    ("jetson-thor-jp7", "sm_110", "10.13"), ("dgx-spark", "sm_121", "11.5"),
])
def test_a_platform_resolves_to_its_architecture_and_tensorrt(platform, arch, trt, tmp_path):
    recipe = write_recipe(tmp_path, tmp_path, tmp_path / "data.csv", targets=[_target(platform=platform)])
    shown = invoke("recipe", "show", recipe)
    assert shown.exit_code == 0, shown.output
    import yaml

    target = yaml.safe_load(shown.output)["targets"][0]
    assert (target["platform"], target["arch"], target["trt_version"]) == (platform, arch, trt)


@pytest.mark.parametrize("fields, fragments", [
    ({"platform": "jetson-orin-jp6", "trt_version": "11.4"}, ("runs TensorRT 10.3", "JetPack 7.2.2", "jetson-orin-jp7.2")),
    ({"platform": "jetson-orin-jp7.2", "trt_version": "11.5"}, ("runs TensorRT 10.16", "not 11.5")),
    ({"platform": "h100", "arch": "sm_80"}, ("platform h100 is sm_90", "drop arch")),
    ({"platform": "tpu-v5"}, ("unknown platform 'tpu-v5'", "jetson-orin-jp6")),
    ({"platform": "h100", "dla_core": 0}, ("has no DLA",)),
    ({"arch": "sm_110", "dla_core": 0}, ("sm_110 has no DLA",)),
    ({"arch": "sm_120", "trt_version": "10.3"}, ("TensorRT 10.3 does not build for sm_120", "10.8 or newer")),
])
def test_what_a_platform_cannot_run_exits_2_naming_its_options(fields, fragments, tmp_path):
    if "dla_core" in fields:
        fields = {**fields, "profiles": [{"batch": {"min": 1, "opt": 1, "max": 1},
                                          "sequence": {"min": 64, "opt": 64, "max": 64}}]}
    recipe = write_recipe(tmp_path, tmp_path, tmp_path / "data.csv", targets=[_target(**fields)])
    assert_clean_failure(invoke("recipe", "validate", recipe), *fragments)


def test_the_table_is_one_source_for_the_schema_the_op_lists_and_targets():
    assert set(get_args(Arch)) == set(ARCHITECTURES)
    assert all(p.arch in ARCHITECTURES and set(p.trt) <= set(TRT_RELEASES) for p in PLATFORMS.values())
    # Every TensorRT a platform offers has an operator list, and every list is a TensorRT of the table.
    assert set(shipped_trt_versions()) == set(TRT_RELEASES)
    from pipeline.recipe.targets import TargetSpec

    assert all(name in TargetSpec.model_fields["platform"].description for name in PLATFORMS)
    listed = invoke("targets", "--json")
    assert listed.exit_code == 0
    rows = {p["name"]: p for p in json.loads(listed.output)["platforms"]}
    assert set(rows) == set(PLATFORMS) and rows["jetson-orin-jp6"]["trt"] == {"10.3": "JetPack 6.0-6.2"}


def test_the_ci_example_builds_one_engine_job_per_platform_with_its_labels_and_tensorrt():
    from pathlib import Path

    import yaml

    ci = Path(__file__).resolve().parents[1] / "recipes" / "ci"
    workflow = yaml.safe_load((ci / "release-engines.yml").read_text())
    # YAML 1.1 reads the key `on:` as true.
    recipe = workflow[True]["workflow_dispatch"]["inputs"]["recipe"]["default"]
    assert recipe == "recipes/ci/every-platform.yaml"
    planned = invoke("plan", str(ci / "every-platform.yaml"))
    assert planned.exit_code == 0, planned.output
    jobs = {job["target"]: job for job in json.loads(planned.output)["jobs"]}
    by_platform = {name.rsplit("-", 1)[0]: job for name, job in jobs.items()}
    assert set(by_platform) == set(PLATFORMS) and len(jobs) == len(PLATFORMS)
    for name, job in by_platform.items():
        platform = PLATFORMS[name]
        assert job["runs_on"] == list(platform.runner) and job["arch"] == platform.arch
        assert job["trt_version"] == platform.default_trt
        jetson = name.startswith("jetson-")
        assert job["container"] == ("" if jetson else f"shipyard-trt:{platform.default_trt}")
    # The image each server job builds is of that job's TensorRT: the table row's pins.
    build = next(step for step in workflow["jobs"]["engine"]["steps"] if "docker build" in step.get("run", ""))
    assert build["env"]["TRT"] == "${{ matrix.trt_version }}" and '--build-arg "TRT=$TRT"' in build["run"]
    for version, release in TRT_RELEASES.items():
        listed = invoke("targets", "--requirements", version)
        assert listed.exit_code == 0 and listed.output.split()[0] == release.wheel
    assert_clean_failure(invoke("targets", "--requirements", "9.0"), "--requirements 9.0", "11.5")


def test_each_operator_list_says_where_it_came_from_and_what_was_inferred():
    from pipeline.trt.readiness import operator_support

    for version in shipped_trt_versions():
        support = operator_support(version)
        assert support["trt_version"] == version and "onnx/onnx-tensorrt docs/operators.md" in support["source"]
        if version not in ("10.15",):  # the one list read from its own tag here
            assert support["inferred"], version
    assert operator_support("11.5")["opset_max"] == 25 and operator_support("10.3")["opset_max"] == 20
    assert "Attention" not in operator_support("10.13")["supported"]  # the parser takes it from 10.14


def test_the_operator_list_generator_reads_onnx_tensorrts_matrix(tmp_path):
    from pipeline.trt.oplists import main, op_list, parse_operators_md

    doc = ("# Supported ONNX Operators\n\nTensorRT 10.15 supports operators in the inclusive range of opset 9 to "
           "opset 24. More details below.\n\n| Operator | Supported | Supported Types | Restrictions |\n"
           "|---|---|---|---|\n| Abs | Y | FP32, FP16 |\n| Bernoulli | N |\n"
           "| CumSum | Y | FP32, FP16, BF16 | `axis` must be a build-time constant |\n")
    parsed = parse_operators_md(doc)
    assert (parsed["trt_version"], parsed["opset_min"], parsed["opset_max"]) == ("10.15", 9, 24)
    assert parsed["supported"]["CumSum"] == {"types": ["FP32", "FP16", "BF16"],
                                             "restriction": "`axis` must be a build-time constant"}
    assert parsed["unsupported"] == ["Bernoulli"]
    with pytest.raises(ValueError, match="say what is inferred"):
        op_list(doc, "11.5", "tag")
    md = tmp_path / "operators.md"
    md.write_text(doc)
    out = tmp_path / "11.5.json"
    assert main([str(md), "--version", "11.5", "--source", "x", "--inferred", "from 10.15", "--opset-max", "25",
                 "--drop", "Abs", "--out", str(out)]) == 0
    made = json.loads(out.read_text())
    assert made["opset_max"] == 25 and "Abs" in made["unsupported"] and made["inferred"] == "from 10.15"


def test_model_device_cuda_without_a_gpu_exits_2_and_a_run_records_where_torch_ran(tiny, tiny_holdout_small, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device: model.device cuda is valid here")
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, model={"device": "cuda"}, targets=[])
    assert_clean_failure(invoke("run", recipe, "--out", tmp_path / "r"), "model.device is cuda",
                         "set model.device to auto or cpu", out=tmp_path / "r")
