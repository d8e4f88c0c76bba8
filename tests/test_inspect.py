"""The engine check after every build (`pipeline.trt.inspect`): the inspector's per-layer JSON
must show the precision the target asked. No GPU host was at hand to record one: the JSON in
tests/data/ is written in the format `IEngineInspector.get_engine_information(JSON)` gives with
detailed profiling verbosity (layer types and "Format/Datatype" strings as TensorRT 10 writes
them) for a 2-layer BERT built three ways."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.errors import ShipyardError
from pipeline.trt.inspect import datatype, layer_precisions, precision_check

DATA = Path(__file__).parent / "data"


def _load(name):
    return json.loads((DATA / name).read_text())


def test_an_fp16_engine_built_as_asked_passes_with_its_layer_counts():
    check = precision_check(_load("inspector-fp16.json"), "fp16")
    assert check.passed, check.message
    # LayerNorm, Softmax, the embeddings and the classifier stay FP32; reformats and shape layers are not counted.
    assert check.layers == {"fp16": 14, "fp32": 8} and check.fp32_share == pytest.approx(8 / 22)


def test_fp16_asked_and_an_fp32_engine_built_fails_naming_the_share():
    check = precision_check(_load("inspector-fp16-built-fp32.json"), "fp16")
    assert not check.passed
    assert "22 of 22 float layers (100%) run in FP32" in check.message and "not shipped" in check.message


def test_an_int8_engine_counts_its_int8_layers_and_passes():
    check = precision_check(_load("inspector-int8.json"), "int8")
    assert check.passed and check.layers["int8"] == 8 and check.to_dict()["fp32_share"] == 0.3636
    assert not precision_check(_load("inspector-fp16-built-fp32.json"), "int8").passed


def test_an_engine_without_per_layer_detail_is_refused_naming_the_verbosity():
    with pytest.raises(ValueError, match="ProfilingVerbosity.DETAILED"):
        layer_precisions({"Layers": ["layer 0", "layer 1"], "Bindings": []})


@pytest.mark.parametrize("text, kind", [
    ("Row major linear FP16 format", "fp16"), ("Half", "fp16"), ("Row major linear FP32", "fp32"),
    ("Row major linear Int8 format", "int8"), ("Row major linear Int64", None), ("Row major linear BF16", "bf16"),
    ("Channel major FP16 format where channel % 8 == 0", "fp16"), ("Bool", None),
])
def test_inspector_datatype_strings(text, kind):
    assert datatype(text) == kind


def test_a_builder_flag_this_tensorrt_lacks_exits_2_naming_it():
    from pipeline.stages.build import builder_flag

    fake = SimpleNamespace(BuilderFlag=SimpleNamespace(SPARSE_WEIGHTS="sparse"))
    assert builder_flag(fake, "SPARSE_WEIGHTS", "11.5.0", "a100") == "sparse"
    with pytest.raises(ShipyardError, match="TensorRT 11.5.0 has no builder flag VERSION_COMPATIBLE") as err:
        builder_flag(fake, "VERSION_COMPATIBLE", "11.5.0", "a100")
    assert getattr(err.value, "exit_code", 2) == 2  # the CLI's exit for bad input or environment


def test_a_rebuild_is_recorded_as_identical_or_not():
    from pipeline.stages.build import rebuild_record

    assert rebuild_record(b"engine", b"engine")["identical"]
    differs = rebuild_record(b"engine", b"engine'")
    assert not differs["identical"] and "the engine shipped is the first" in differs["note"]
    assert not rebuild_record(b"engine", None)["identical"]  # the rebuild failed
