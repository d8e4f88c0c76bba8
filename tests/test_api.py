"""The public Python API (`from pipeline import run_recipe, load_recipe, ...`), as the README shows it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import pipeline


@pytest.mark.parametrize("name", pipeline.__all__)
def test_every_public_name_is_the_object_its_module_defines(name):
    module = importlib.import_module(pipeline._API[name])
    assert getattr(pipeline, name) is getattr(module, name)


def test_importing_the_package_and_the_cli_loads_no_heavy_library():
    code = ("import sys, pipeline, pipeline.cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'run_everything'"):
        pipeline.run_everything  # noqa: B018
