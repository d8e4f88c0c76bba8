"""The schema's default of one setting, by its recipe key: what a standalone command starts from
when it is not told, so that it and a recipe's stage start from the same values."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pipeline.recipe.schema import Thresholds
from pipeline.recipe.stages import (
    DataSpec,
    ExportSpec,
    ModelSpec,
    PruneSpec,
    QuantizeSpec,
    RecoverSpec,
    SmoothingSpec,
)

SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataSpec, "export": ExportSpec, "model": ModelSpec, "prune": PruneSpec, "quantize": QuantizeSpec,
    "recover": RecoverSpec, "smoothing": SmoothingSpec, "thresholds": Thresholds,
}


def schema_default(key: str) -> Any:
    """The default of `section.field`, e.g. schema_default("data.tuning_samples") -> 256."""
    section, name = key.split(".")
    return SECTIONS[section].model_fields[name].get_default(call_default_factory=True)
