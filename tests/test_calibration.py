import json

import numpy as np
import pytest

from calibration.encode import Encoder, label_ids, load_tokenizer
from calibration.errors import DataError
from calibration.readers import ort_calibration_reader
from calibration.sampling import Columns, Side, disjoint_splits, fingerprint, sample_rows
from calibration.sources import load_rows, require_columns

ROWS = [{"text": f"tweet number {i}", "label": ["neg", "neu", "pos"][i % 3]} for i in range(90)]


@pytest.fixture
def sources(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    paths = {}
    paths["csv"] = tmp_path / "d.csv"
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(ROWS)
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    paths["hf"] = tmp_path / "saved"
    Dataset.from_list(ROWS).save_to_disk(str(paths["hf"]))
    return paths


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet", "hf"])
def test_every_format_loads_the_same_rows(sources, kind):
    assert load_rows(sources[kind]) == ROWS


def test_txt_is_one_text_a_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line\n\nsecond line\n")
    assert load_rows(path) == [{"text": "first line"}, {"text": "second line"}]


def test_latin1_csv_needs_its_encoding_named(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes("text,label\ncaf\xe9 au lait,pos\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"byte 0xe9 at offset 14 is not valid UTF-8; name the file's encoding"):
        load_rows(path)
    assert load_rows(path, "latin-1")[0]["text"] == "café au lait"
    with pytest.raises(DataError, match="unknown encoding 'latin-9000'"):
        load_rows(path, "latin-9000")


def test_missing_empty_and_columnless_sources_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_rows(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="no column 'sentence'"):
        require_columns(ROWS, ["sentence"], tmp_path / "x.csv")


def test_splits_are_disjoint_seeded_and_stratified(tmp_path):
    side = Side(ROWS, Columns("text", None, "label"), tmp_path)
    a = disjoint_splits(side, side, 30, 15, 45, 7, "stratified")
    b = disjoint_splits(side, side, 30, 15, 45, 7, "stratified")
    assert a == b
    texts = [{r["text"] for r in split} for split in (a.calibration, a.tuning, a.evaluation)]
    assert [len(t) for t in texts] == [30, 15, 45]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    assert sorted(r["label"] for r in a.calibration).count("neg") == 10
    c = disjoint_splits(side, side, 30, 15, 45, 8, "stratified")
    assert fingerprint(c.calibration) != fingerprint(a.calibration)


def test_splits_stay_disjoint_across_overlapping_files_with_other_column_names(tmp_path):
    """Calibration has no labels; evaluation names its columns differently: keys still match."""
    calibration = Side([{"text": r["text"]} for r in ROWS], Columns("text"), tmp_path / "cal.csv")
    other = [{"sentence": r["text"], "gold": r["label"]} for r in ROWS] + [{"sentence": "only in eval", "gold": "neg"}]
    evaluation = Side(other, Columns("sentence", None, "gold"), tmp_path / "eval.csv")
    splits = disjoint_splits(calibration, evaluation, 40, 45, 6, 0, "stratified")
    seen = {r["text"] for r in splits.calibration + splits.tuning}
    assert len(seen) == 85 and all(r["sentence"] not in seen for r in splits.evaluation)
    with pytest.raises(DataError, match=r"evaluation \(after the calibration and tuning rows\) asks for 7 rows but only 6"):
        disjoint_splits(calibration, evaluation, 40, 45, 7, 0, "stratified")


def test_too_few_rows_names_the_split(tmp_path):
    with pytest.raises(DataError, match="calibration asks for 100 rows but only 90"):
        sample_rows(ROWS, 100, Columns("text"), 0, "random", tmp_path, "calibration")


def test_encoder_pads_truncates_and_reader_rewinds(tiny):
    tok = load_tokenizer(tiny.model, "text")
    long_text = {"text": "word " * 200}
    fixed = Encoder(tok, Columns(), max_length=32, padding="max_length", encoding="text").encode([{"text": "hi"}, long_text])
    assert fixed["input_ids"].shape == (2, 32) and fixed["input_ids"].dtype == np.int64
    assert fixed["attention_mask"][0].sum() < 32 and fixed["attention_mask"][1].sum() == 32
    short = Encoder(tok, Columns(), max_length=32, padding="longest", encoding="text").encode([{"text": "hi"}, {"text": "hi there"}])
    assert short["input_ids"].shape[1] < 32
    pairs = Encoder(tok, Columns("q", "a"), 32, "max_length", "text").encode([{"q": "who?", "a": "me."}])
    assert pairs["token_type_ids"].max() == 1
    batches = list(Encoder(tok, Columns(), 16, "max_length", "text").batches([{"text": "x"}] * 6, 2))
    reader = ort_calibration_reader(batches, ["input_ids", "attention_mask"])
    first = [reader.get_next() for _ in range(4)]
    assert first[-1] is None and set(first[0]) == {"input_ids", "attention_mask"}
    reader.rewind()
    assert reader.get_next() is not None


def test_unknown_labels_are_rejected(tmp_path):
    with pytest.raises(DataError, match=r"labels \['neg'\].*not in the model's id2label"):
        label_ids(ROWS[:1], "label", {"negative": 0, "positive": 1}, tmp_path / "x.csv")
    ids = label_ids([{"l": "positive"}, {"l": "0"}, {"l": 1}], "l", {"negative": 0, "positive": 1}, tmp_path)
    assert ids.tolist() == [1, 0, 1]


def test_calibration_reader_batches_are_uniform_for_histogram_calibrators():
    from calibration.readers import uniform_batches

    even = [{"input_ids": np.zeros((4, 8), np.int64)}] * 3
    assert uniform_batches(even) is even
    ragged = [{"input_ids": np.zeros((4, 8), np.int64)}, {"input_ids": np.zeros((2, 8), np.int64)}]
    assert [b["input_ids"].shape for b in uniform_batches(ragged)] == [(1, 8)] * 6


def test_a_damaged_parquet_or_a_folder_without_a_dataset_is_named_as_such(sources, tmp_path):
    """What pyarrow and datasets raise for a bad file or a foreign folder is bad input, named;
    anything else keeps its own type (see calibration/sources.py)."""
    whole = sources["parquet"].read_bytes()
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="damaged.parquet: not a readable parquet file"):
        load_rows(damaged)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a dataset")
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        load_rows(foreign)
