"""Shipyard: export, prune, quantize, build and parity-gate fine-tuned BERT models.

The Python API is the CLI's engine, for release scripts and notebooks::

    from pipeline import load_recipe, run_recipe, RunOptions, StageCache

    recipe = load_recipe("recipes/minilm-tweets.yaml", ("data.max_length=64",))
    outcome = run_recipe(recipe, Path("release/minilm-tweets"),
                         options=RunOptions(overwrite=True, cache=StageCache.at(None)))
    assert outcome.passed, outcome.manifest.artifacts

Names are imported on first use, so `import pipeline` (and `shipyard --help`) loads no torch,
ONNX Runtime or numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {
    "load_recipe": "pipeline.recipe",
    "parse_recipe": "pipeline.recipe",
    "Recipe": "pipeline.recipe",
    "run_recipe": "pipeline.run.workflow",
    "RunOptions": "pipeline.run.workflow",
    "RunOutcome": "pipeline.run.workflow",
    "StageCache": "pipeline.run.cache",
    "Manifest": "pipeline.release.manifest",
    "verify_folder": "pipeline.release.signing",
    "check_model_file": "pipeline.trt.readiness",
    "ShipyardError": "pipeline.errors",
}
__all__ = [
    "Manifest", "Recipe", "RunOptions", "RunOutcome", "ShipyardError", "StageCache", "check_model_file",
    "load_recipe", "parse_recipe", "run_recipe", "verify_folder",
]
assert sorted(__all__) == sorted(_API)

if TYPE_CHECKING:
    from pipeline.errors import ShipyardError
    from pipeline.recipe import Recipe, load_recipe, parse_recipe
    from pipeline.release.manifest import Manifest
    from pipeline.release.signing import verify_folder
    from pipeline.run.cache import StageCache
    from pipeline.run.workflow import RunOptions, RunOutcome, run_recipe
    from pipeline.trt.readiness import check_model_file


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
