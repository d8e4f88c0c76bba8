import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import RecipeError
from pipeline.recipe import load_recipe, parse_recipe, recipe_json_schema
from pipeline.release.manifest import manifest_json_schema

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.name
    jsonschema.validate(yaml.safe_load(path.read_text()), recipe_json_schema())


def test_committed_schemas_match_the_code():
    assert json.loads((RECIPES / "recipe.schema.json").read_text()) == recipe_json_schema()
    assert json.loads((RECIPES / "manifest.schema.json").read_text()) == manifest_json_schema()


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    raw = yaml.safe_load((RECIPES / "minilm-tweets.yaml").read_text())
    raw["data"]["max_lenght"] = 64
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"data\.max_lenght: unknown key"):
        load_recipe(path)


def test_wrong_type_is_named():
    with pytest.raises(RecipeError, match=r"thresholds\.int8\.min_agreement"):
        load_recipe(RECIPES / "minilm-tweets.yaml", ("thresholds.int8.min_agreement=lots",))


def test_int8_target_without_qdq_artifact_is_refused():
    with pytest.raises(RecipeError, match=r"recipe: target a100-int8: int8 engines are built from the Q/DQ artifact"):
        load_recipe(RECIPES / "minilm-tweets.yaml", ("stages.quantize.formats=[cpu]",))


def test_overrides_apply_and_show_prints_resolved_yaml():
    result = CliRunner().invoke(cli, ["recipe", "show", str(RECIPES / "minilm-tweets.yaml"),
                                      "--set", "data.max_length=32", "--set", "stages.quantize.method=entropy"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["data"]["max_length"] == 32
    assert shown["stages"]["quantize"]["method"] == "entropy"
    assert shown["thresholds"]["int8"]["min_agreement"] == 0.98  # defaults are filled in
    assert Path(shown["model"]["path"]).is_absolute()


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "rel", "model": {"path": "../model"},
        "data": {"calibration": {"path": "cal.csv", "samples": 2},
                 "evaluation": {"path": "cal.csv", "samples": 2}},
    }))
    recipe = load_recipe(path)
    assert recipe.model.path == tmp_path / "model"
    assert recipe.data.calibration.path == tmp_path / "sub" / "cal.csv"


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["recipe", "validate", str(RECIPES / "minilm-tweets.yaml")])
    assert ok.exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {path: m}\ndata: {calibration: {path: a, samples: 1}, "
                   "evaluation: {path: a, samples: 1}}\nstages: {quantise: {}}\n")
    result = runner.invoke(cli, ["recipe", "validate", str(bad)])
    assert result.exit_code == 2
    assert "stages.quantise: unknown key" in result.output
    assert "Traceback" not in result.output


def test_unlabeled_recipe_gates_no_metric_and_its_resolved_form_loads_again(tmp_path):
    """Without labels the default metric-drop gates are null (not checked, and recorded so), a
    written one is refused, and the resolved recipe a manifest records loads again."""
    raw = {"name": "emb", "model": {"path": "m"},
           "data": {"calibration": {"path": "d.csv", "samples": 8}, "evaluation": {"path": "d.csv", "samples": 8}}}
    recipe = parse_recipe(raw, "r.yaml", tmp_path)
    assert all(getattr(recipe.thresholds, kind).max_metric_drop is None for kind in ("fp32", "pruned", "fp16", "int8"))
    assert recipe.thresholds.int8.min_agreement == 0.98
    again = parse_recipe(json.loads(recipe.model_dump_json()), "manifest", tmp_path)
    assert again == recipe
    raw["thresholds"] = {"int8": {"max_metric_drop": 0.01}}
    with pytest.raises(RecipeError, match="thresholds.int8.max_metric_drop needs gold labels"):
        parse_recipe(raw, "r.yaml", tmp_path)
