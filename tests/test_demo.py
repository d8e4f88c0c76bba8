import csv
import random

from click.testing import CliRunner
from conftest import TINY

from pipeline.cli import cli
from pipeline.run.demo import prepare_demo, read_tweets


def test_holdout_never_overlaps_the_fine_tuning_rows(tiny):
    rows = read_tweets()
    random.Random(0).shuffle(rows)
    trained = {r["text"] for r in rows[: TINY["train_rows"]]}
    with tiny.holdout.open(encoding="utf-8") as f:
        holdout = list(csv.DictReader(f))
    assert len(holdout) > 30000
    assert not trained & {r["text"] for r in holdout}
    assert {r["sentiment"] for r in holdout} == {"negative", "neutral", "positive"}


def test_prepare_is_cached(tiny):
    before = (tiny.model / "model.safetensors").stat().st_mtime_ns
    again = prepare_demo(tiny.model.parent, **TINY)
    assert again == tiny
    assert (tiny.model / "model.safetensors").stat().st_mtime_ns == before


def test_tiny_model_learned_something(tiny_release):
    """The shared fixture must be a real classifier, or parity tests prove little."""
    parity = tiny_release.manifest.artifacts[0].parity
    assert parity["reference_metrics"]["accuracy"] > 0.6
    assert parity["reference_metrics"]["macro_f1"] > 0.4


def test_demo_prepare_cli_reports_paths(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "prepare", "--home", str(tmp_path), "--layers", "1",
                                      "--train-rows", "64", "--json"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "tweets-holdout.csv") in result.output
    assert (tmp_path / "minilm-tweets" / "config.json").is_file()
    # The embeddings demo's model: the packaged MiniLM with its sentence-transformers pooling.
    assert (tmp_path / "minilm-embeddings" / "modules.json").is_file()
