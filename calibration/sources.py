"""Load rows (dicts) from the data formats release engineers keep evaluation text in.

Supported: `.csv` and `.txt` (one text a line, column `text`) in UTF-8 or the encoding the source
names, `.jsonl` (UTF-8), `.parquet`, and a Hugging Face dataset folder written by `save_to_disk`.
Text that is not valid in its encoding is an error naming the byte and the fix, never a silent
guess: a latin-1 guess turns UTF-8 mojibake into plausible, wrong tokens. Nothing is fetched
from a hub: a path that does not exist is an error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from calibration.errors import DataError

Row = dict[str, Any]
SUPPORTED = ".csv, .jsonl, .txt, .parquet, or a folder saved with datasets' save_to_disk"


def _decoded(path: Path, encoding: str | None, read):
    """`read(file)` over `path` opened as text in `encoding` (default UTF-8, BOM allowed)."""
    name = encoding or "utf-8-sig"
    try:
        with path.open(newline="", encoding=name) as f:
            return read(f)
    except LookupError:
        raise DataError(f"data {path}: unknown encoding {encoding!r}; use a Python codec name such as "
                        "utf-8, latin-1 or cp1252") from None
    except UnicodeDecodeError as err:
        byte = err.object[err.start:err.start + 1].hex()
        raise DataError(f"data {path}: byte 0x{byte} at offset {err.start} is not valid {encoding or 'UTF-8'}; "
                        "name the file's encoding (encoding: latin-1 in the recipe's source, or --encoding) "
                        "or re-save it as UTF-8") from None


def _read_csv(path: Path, encoding: str | None) -> list[Row]:
    return _decoded(path, encoding, lambda f: list(csv.DictReader(f)))


def _read_jsonl(path: Path, encoding: str | None) -> list[Row]:
    rows = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028, which splitlines breaks on.
    lines = _decoded(path, encoding, lambda f: f.read().split("\n"))
    for number, line in enumerate(lines, 1):
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


def _read_txt(path: Path, encoding: str | None) -> list[Row]:
    return _decoded(path, encoding, lambda f: [{"text": line} for line in f.read().splitlines() if line.strip()])


def _read_parquet(path: Path, encoding: str | None) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:  # not parquet, damaged, or a feature arrow lacks
        raise DataError(f"data {path}: not a readable parquet file ({type(err).__name__})") from None


def _read_saved_dataset(path: Path) -> list[Row]:
    import pyarrow as pa
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    # The folder exists (checked first): datasets says FileNotFoundError when it holds no dataset
    # or misses a file of one, ValueError or ArrowInvalid for damaged ones. A folder this user may
    # not read (PermissionError) is not caught: the CLI names it as an input to make readable.
    except (FileNotFoundError, ValueError, pa.ArrowInvalid) as err:
        raise DataError(
            f"data {path}: folder is not a dataset saved with save_to_disk ({type(err).__name__})"
        ) from None
    if isinstance(dataset, DatasetDict):
        split = "train" if "train" in dataset else next(iter(dataset))
        dataset = dataset[split]
    return dataset.to_list()


def load_rows(path: Path, encoding: str | None = None) -> list[Row]:
    """All rows of a data source, as dicts keyed by column name; `encoding` applies to text files."""
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
        rows = reader(path, encoding)
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
