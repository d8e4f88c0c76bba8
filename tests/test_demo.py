import csv

from click.testing import CliRunner
from conftest import TINY

from pipeline.cli import cli
from pipeline.run.demo import prepare_demo, read_tweets


def test_holdout_never_overlaps_the_fine_tuning_rows(tiny):
    """The rows the model was fine-tuned on (written beside the hold-out) and the hold-out share no
    text, and together they are the corpus's rows, none lost."""
    def texts(path):
        with path.open(newline="", encoding="utf-8") as f:  # texts hold line breaks
            return [r["text"] for r in csv.DictReader(f)]

    trained, holdout = texts(tiny.training), texts(tiny.holdout)
    assert len(trained) == TINY["train_rows"] and len(holdout) > 30000
    assert not set(trained) & set(holdout)
    assert set(trained) | set(holdout) == {r["text"] for r in read_tweets()}
    with tiny.holdout.open(encoding="utf-8") as f:
        assert {r["sentiment"] for r in csv.DictReader(f)} == {"negative", "neutral", "positive"}


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
