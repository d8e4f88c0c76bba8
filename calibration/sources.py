"""Load rows (dicts) from the data formats release engineers keep evaluation text in.

Supported: `.csv` (UTF-8, falling back to latin-1), `.jsonl`, `.txt` (one text a line, column
`text`), `.parquet`, and a Hugging Face dataset folder written by `save_to_disk`. Nothing is
fetched from a hub: a path that does not exist is an error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from calibration.errors import DataError

Row = dict[str, Any]
SUPPORTED = ".csv, .jsonl, .txt, .parquet, or a folder saved with datasets' save_to_disk"


def _read_csv(path: Path) -> list[Row]:
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            with path.open(newline="", encoding=encoding) as f:
                return list(csv.DictReader(f))
        except UnicodeDecodeError:
            continue
    raise DataError(f"data {path}: cannot decode as UTF-8 or latin-1; re-save it as UTF-8")


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"data {path} line {number}: not valid JSON; fix or remove it") from None
            if not isinstance(row, dict):
                raise DataError(f"data {path} line {number}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_txt(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", errors="replace") as f:
        return [{"text": line.rstrip("\n")} for line in f if line.strip()]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"data {path}: not a readable parquet file ({type(err).__name__})") from None


def _read_saved_dataset(path: Path) -> list[Row]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError/ValueError for foreign folders
        raise DataError(
            f"data {path}: folder is not a dataset saved with save_to_disk ({type(err).__name__})"
        ) from None
    if isinstance(dataset, DatasetDict):
        split = "train" if "train" in dataset else next(iter(dataset))
        dataset = dataset[split]
    return dataset.to_list()


def load_rows(path: Path) -> list[Row]:
    """All rows of a data source, as dicts keyed by column name."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data {path} not found; pass an existing {SUPPORTED}")
    if path.is_dir():
        rows = _read_saved_dataset(path)
    else:
        readers = {".csv": _read_csv, ".jsonl": _read_jsonl, ".txt": _read_txt, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"data {path}: unsupported format {path.suffix!r}; use {SUPPORTED}")
        rows = reader(path)
    if not rows:
        raise DataError(f"data {path} is empty; it needs at least one row")
    return rows


def require_columns(rows: list[Row], columns: list[str], path: Path) -> None:
    """Fail naming the first column the rows lack, with the columns they do have."""
    present = list(rows[0].keys())
    for column in columns:
        if column not in present:
            raise DataError(
                f"data {path} has no column {column!r} (columns: {', '.join(map(str, present))}); "
                "set the column names in the recipe or with --text-column/--label-column"
            )
