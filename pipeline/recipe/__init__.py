"""The one recipe schema: what to ship, from which data, through which stages, held to which gates.

A recipe is YAML validated by these pydantic models (`extra="forbid"`, so a misspelt key is an
error that names it). `load_recipe` reads a file, applies `--set key=value` overrides and resolves
relative paths against the recipe's folder, so the resolved recipe in a manifest reruns anywhere.

The schema is split by section (`stages`, `targets`, `schema` for the whole and its cross-section
checks, `load` for reading); this package's names are the schema's public face.
"""

from pipeline.recipe.load import load_recipe, parse_recipe, recipe_json_schema
from pipeline.recipe.schema import Gate, Recipe, Thresholds
from pipeline.recipe.stages import (
    BudgetSpec,
    BuildSpec,
    DataSpec,
    ExportSpec,
    FallbackSpec,
    ModelSpec,
    PruneSpec,
    QuantizeSpec,
    RecoverSpec,
    SmoothingSpec,
    SourceSpec,
    StagesSpec,
)
from pipeline.recipe.targets import ProfileSpec, Range, TargetSpec

__all__ = [
    "BudgetSpec", "BuildSpec", "DataSpec", "ExportSpec", "FallbackSpec", "Gate", "ModelSpec", "ProfileSpec",
    "PruneSpec", "QuantizeSpec", "Range", "Recipe", "RecoverSpec", "SmoothingSpec", "SourceSpec", "StagesSpec",
    "TargetSpec", "Thresholds", "load_recipe", "parse_recipe", "recipe_json_schema",
]
