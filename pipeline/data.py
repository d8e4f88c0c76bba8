"""The recipe's data section made concrete: disjoint splits, batches, labels, fingerprints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.encode import Encoder, label_ids, split_words
from calibration.sampling import Columns, disjoint_splits, fingerprint, sample_rows, usable_rows
from calibration.sources import Row, load_rows, require_columns
from pipeline.errors import DataError
from pipeline.recipe import DataSpec

Batch = dict[str, np.ndarray]


@dataclass
class EvalSet:
    """Evaluation rows tokenized in batches, with their gold labels (if any): class ids
    (classification), tag names per word (token classification) or answer texts (QA)."""

    source: Path
    rows: list[Row]
    batches: list[Batch]
    labels: Any
    columns: Columns
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


def gold_labels(rows: list[Row], columns: Columns, label2id: dict[str, int], task: str, source: Path) -> Any:
    """The rows' gold labels in the form `task` compares, or a one-line `DataError` naming the row."""
    if not columns.label:
        return None
    if task == "text-classification":
        return label_ids(rows, columns.label, label2id, source)
    if task == "feature-extraction":
        raise DataError(f"data {source}: feature-extraction has no gold labels; remove label_column "
                        f"({columns.label!r}) or use the model's classification head")
    if task == "token-classification":
        return _gold_tags(rows, columns, label2id, source)
    return _gold_answers(rows, columns, source)


def _gold_tags(rows: list[Row], columns: Columns, label2id: dict[str, int], source: Path) -> list[list[str]]:
    id2label = {i: name for name, i in label2id.items()}
    gold = []
    for number, row in enumerate(rows, 1):
        tags = row[columns.label]
        if not isinstance(tags, (list, tuple)):
            raise DataError(f"data {source} row {number}: column {columns.label!r} holds {str(tags)[:40]!r}, not a "
                            "list of tags per word; store tags as lists (jsonl, parquet or a saved dataset)")
        words = split_words(row[columns.text])
        if len(tags) != len(words):
            raise DataError(f"data {source} row {number}: {len(tags)} tags for {len(words)} words in "
                            f"{columns.text!r}; give one tag per word")
        names = [id2label.get(int(t)) if isinstance(t, int) or str(t).isdigit() else str(t) for t in tags]
        unknown = sorted({str(t) for t, n in zip(tags, names) if n is None or n not in label2id})
        if unknown:
            raise DataError(f"data {source} row {number}: tags {unknown[:5]} are not in the model's id2label "
                            f"{sorted(label2id)}; fix the data or the model config")
        gold.append(names)
    return gold


def _gold_answers(rows: list[Row], columns: Columns, source: Path) -> list[list[str]]:
    """Answers as a string, a list of strings, or SQuAD's {"text": [...], "answer_start": [...]}."""
    gold = []
    for number, row in enumerate(rows, 1):
        value = row[columns.label]
        answers = value.get("text") if isinstance(value, dict) else value
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        context = str(row[columns.text_pair])
        if not answers or not all(isinstance(a, str) and a and a in context for a in answers):
            raise DataError(f"data {source} row {number}: answer {str(value)[:60]!r} in column {columns.label!r} is "
                            f"not found in its context; each answer must be a non-empty span of {columns.text_pair!r}")
        gold.append(answers)
    return gold


def make_eval_set(source: Path, rows: list[Row], encoder: Encoder, batch_size: int,
                  label2id: dict[str, int]) -> EvalSet:
    columns = encoder.columns
    return EvalSet(
        source=source, rows=rows, batches=list(encoder.batches(rows, batch_size)),
        labels=gold_labels(rows, columns, label2id, encoder.task, source), columns=columns,
        fingerprint=fingerprint(rows),
    )


def prepare(spec: DataSpec, tokenizer, label2id: dict[str, int], task: str = "text-classification") -> PreparedData:
    """Load both sources, draw disjoint seeded splits, check labels and tokenize for `task`."""
    columns = columns_of(spec)
    cal_path, eval_path = spec.calibration.path, spec.evaluation.path
    cal_rows = _load(cal_path, columns)
    eval_rows = cal_rows if eval_path == cal_path else _load(eval_path, columns)
    splits = disjoint_splits(
        cal_rows, eval_rows, spec.calibration.samples, spec.evaluation.samples, columns,
        spec.seed, spec.sampling, cal_path, eval_path,
    )
    encoder = Encoder(tokenizer, columns, spec.max_length, spec.padding, task)
    # ORT's entropy and percentile calibrators stack all batches into one array, so calibration
    # batches are always padded to max_length; `padding` shapes the evaluation batches only.
    calibration_encoder = Encoder(tokenizer, columns, spec.max_length, "max_length", task)
    # Wrong labels in calibration rows are as wrong as in evaluation rows.
    gold_labels(splits.calibration, columns, label2id, task, cal_path)
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
