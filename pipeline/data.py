"""The recipe's data section made concrete: disjoint splits, batches, labels, fingerprints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.encode import Encoder, label_ids
from calibration.sampling import Columns, disjoint_splits, fingerprint, sample_rows, usable_rows
from calibration.sources import Row, load_rows, require_columns
from pipeline.recipe import DataSpec

Batch = dict[str, np.ndarray]


@dataclass
class EvalSet:
    """Evaluation rows tokenized in batches, with their labels (if any) and texts for the report."""

    source: Path
    rows: list[Row]
    batches: list[Batch]
    labels: np.ndarray | None
    texts: list[str]
    fingerprint: str


@dataclass
class PreparedData:
    calibration_source: Path
    calibration_rows: list[Row]
    calibration_batches: list[Batch]
    calibration_fingerprint: str
    evaluation: EvalSet


def columns_of(spec: DataSpec) -> Columns:
    return Columns(spec.text_column, spec.text_pair_column, spec.label_column)


def _load(path: Path, columns: Columns) -> list[Row]:
    rows = load_rows(path)
    require_columns(rows, columns.needed(), path)
    return rows


def make_eval_set(source: Path, rows: list[Row], encoder: Encoder, batch_size: int,
                  label2id: dict[str, int]) -> EvalSet:
    columns = encoder.columns
    labels = label_ids(rows, columns.label, label2id, source) if columns.label else None
    return EvalSet(
        source=source, rows=rows, batches=list(encoder.batches(rows, batch_size)), labels=labels,
        texts=[str(r[columns.text]) for r in rows], fingerprint=fingerprint(rows),
    )


def prepare(spec: DataSpec, tokenizer, label2id: dict[str, int]) -> PreparedData:
    """Load both sources, draw disjoint seeded splits, check labels and tokenize."""
    columns = columns_of(spec)
    cal_path, eval_path = spec.calibration.path, spec.evaluation.path
    cal_rows = _load(cal_path, columns)
    eval_rows = cal_rows if eval_path == cal_path else _load(eval_path, columns)
    splits = disjoint_splits(
        cal_rows, eval_rows, spec.calibration.samples, spec.evaluation.samples, columns,
        spec.seed, spec.sampling, cal_path, eval_path,
    )
    encoder = Encoder(tokenizer, columns, spec.max_length, spec.padding)
    # ORT's entropy and percentile calibrators stack all batches into one array, so calibration
    # batches are always padded to max_length; `padding` shapes the evaluation batches only.
    calibration_encoder = Encoder(tokenizer, columns, spec.max_length, "max_length")
    if columns.label:  # unknown labels in calibration rows are as wrong as in evaluation rows
        label_ids(splits.calibration, columns.label, label2id, cal_path)
    return PreparedData(
        calibration_source=cal_path,
        calibration_rows=splits.calibration,
        calibration_batches=list(calibration_encoder.batches(splits.calibration, spec.batch_size)),
        calibration_fingerprint=fingerprint(splits.calibration),
        evaluation=make_eval_set(eval_path, splits.evaluation, encoder, spec.batch_size, label2id),
    )


def load_sample(path: Path, columns: Columns, samples: int | None, seed: int, what: str) -> list[Row]:
    """Rows of one source for a standalone command: all usable rows, or a seeded sample."""
    rows = usable_rows(_load(path, columns), columns)
    if samples is None:
        return rows
    return sample_rows(rows, samples, columns, seed, "stratified", path, what)
