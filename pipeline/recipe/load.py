"""Reading a recipe: YAML, `--set key=value` overrides, errors that name the key, paths resolved
against the recipe's folder (so the resolved recipe in a manifest reruns anywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import RecipeError
from pipeline.recipe.schema import Recipe


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {assignment!r}: expected key=value, e.g. --set data.max_length=64")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {part!r} is not a section of the recipe")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "recipe"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling against recipes/recipe.schema.json"
    return f"{source}: {where}: {msg}{more}"


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    recipe.model.path = resolve(recipe.model.path)
    recipe.data.calibration.path = resolve(recipe.data.calibration.path)
    recipe.data.evaluation.path = resolve(recipe.data.evaluation.path)
    if recipe.data.training is not None:
        recipe.data.training.path = resolve(recipe.data.training.path)
    for target in recipe.targets:
        if target.timing_cache is not None:
            target.timing_cache = resolve(target.timing_cache)
    return recipe


def parse_recipe(raw: Any, source: str, base: Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Validate a recipe dict (after overrides) and resolve its paths against `base`."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with name, model and data")
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(source, err)) from None
    return _resolve_paths(recipe, base)


def load_recipe(path: Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe file; relative paths in it are relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found; pass the path of a YAML recipe file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {path}{line}: not valid YAML; fix the syntax") from None
    return parse_recipe(raw, str(path), path.resolve().parent, overrides)


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe, as committed in recipes/recipe.schema.json."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Shipyard recipe"
    return schema
