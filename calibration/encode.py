"""Rows -> tokenized batches (`dict[str, np.ndarray]` of int64), with the model's own tokenizer."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from calibration.errors import DataError, ShipyardError
from calibration.sampling import Columns
from calibration.sources import Row

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json", "spiece.model")


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in a model folder; never downloads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShipyardError(f"tokenizer folder {folder} not found; pass the fine-tuned model's folder")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ShipyardError(
            f"model folder {folder} has no tokenizer (no tokenizer.json or vocab.txt); "
            "save it there with tokenizer.save_pretrained(folder)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@dataclass
class Encoder:
    """Tokenizes rows the way the model will see them in production."""

    tokenizer: Any
    columns: Columns
    max_length: int = 128
    padding: Literal["max_length", "longest"] = "max_length"

    def encode(self, rows: list[Row]) -> dict[str, np.ndarray]:
        texts = [str(r[self.columns.text]) for r in rows]
        pairs = [str(r[self.columns.text_pair]) for r in rows] if self.columns.text_pair else None
        enc = self.tokenizer(
            texts,
            pairs,
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return {name: np.asarray(value, dtype=np.int64) for name, value in enc.items()}

    def batches(self, rows: list[Row], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(rows), batch_size):
            yield self.encode(rows[start : start + batch_size])


def label_ids(rows: list[Row], label_column: str, label2id: Mapping[str, int], source: Path) -> np.ndarray:
    """Map each row's label (a name from `id2label`, or an id) to the model's class id."""
    id_set = set(label2id.values())
    ids = []
    unknown: set[str] = set()
    for row in rows:
        value = row[label_column]
        if str(value) in label2id:
            ids.append(label2id[str(value)])
        elif str(value).lstrip("-").isdigit() and int(value) in id_set:
            ids.append(int(value))
        else:
            unknown.add(str(value))
    if unknown:
        raise DataError(
            f"data {source}: labels {sorted(unknown)} in column {label_column!r} are not in the model's "
            f"id2label {sorted(label2id)}; fix the data or the model config"
        )
    return np.asarray(ids, dtype=np.int64)
