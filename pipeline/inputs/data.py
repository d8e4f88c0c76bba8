"""The recipe's data section made concrete: disjoint splits, batches, labels, fingerprints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.encode import Encoder, label_ids, split_words
from calibration.sampling import (
    Columns,
    Side,
    disjoint_splits,
    fingerprint,
    row_digest,
    sample_rows,
    usable_rows,
)
from calibration.sources import Row, load_rows, require_columns
from pipeline.errors import DataError
from pipeline.names import Padding
from pipeline.recipe import DataSpec, SourceSpec
from pipeline.tasks import task_spec

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

    def cache_identity(self) -> dict[str, Any]:
        """What a validation's cache key records of its rows: their content, tokens and columns
        (the gold labels follow from the rows and the model's labels, which the key records too)."""
        return {"rows": self.fingerprint, "batches": self.batches,
                "columns": [self.columns.text, self.columns.text_pair, self.columns.label]}


@dataclass
class Split:
    """Rows drawn from one source for one purpose, tokenized, with their fingerprint and the
    content digests artifacts record (`row_digest`)."""

    source: Path
    rows: list[Row]
    batches: list[Batch]
    fingerprint: str
    digests: list[str]

    @classmethod
    def of(cls, source: Path, rows: list[Row], encoder: Encoder, batch_size: int, encode: bool = True) -> Split:
        """`rows` tokenized in batches; without `encode`, their identity only (phase two, which
        gates on the evaluation rows, needs to know which rows these were, not their tokens)."""
        batches = list(encoder.batches(rows, batch_size)) if encode else []
        return cls(source, rows, batches, fingerprint(rows), [row_digest(encoder.columns, r) for r in rows])


@dataclass
class PreparedData:
    """Calibration rows set activation scales and pruning scores; tuning rows choose (prune
    budget, INT8 float fallback); evaluation rows only judge. No row is in two of them."""

    calibration: Split
    tuning: Split
    evaluation: EvalSet

    @property
    def seen_digests(self) -> list[str]:
        """Digests of every row a stage may have fitted or chosen on."""
        return sorted(set(self.calibration.digests) | set(self.tuning.digests))


def source_columns(spec: DataSpec, source: SourceSpec, header: list[str] | None = None) -> Columns:
    """The columns of one source: its own names, else the data section's. For calibration
    (`header` given) the label column is used only when the source names it or has it."""
    label = source.label_column or spec.label_column
    if header is not None and source.label_column is None and label not in header:
        label = None
    return Columns(source.text_column or spec.text_column, source.text_pair_column or spec.text_pair_column, label)


def _load(path: Path, columns: Columns, encoding: str | None = None) -> list[Row]:
    rows = load_rows(path, encoding)
    require_columns(rows, columns.needed(), path)
    return rows


def gold_labels(rows: list[Row], columns: Columns, label2id: dict[str, int], task: str, source: Path) -> Any:
    """The rows' gold labels in the form `task` compares, or a one-line `DataError` naming the row."""
    label = columns.label
    if not label:
        return None
    kind = task_spec(task).kind
    if kind == "class":
        return label_ids(rows, label, label2id, source)
    if kind == "embedding":
        raise DataError(f"data {source}: {task} has no gold labels; remove label_column "
                        f"({columns.label!r}) or use the model's classification head")
    if kind == "tag":
        return _gold_tags(rows, columns.text, label, label2id, source)
    if not columns.text_pair:
        raise DataError(f"data {source}: question answering reads the context from text_pair_column; set it")
    return _gold_answers(rows, columns.text_pair, label, source)


def _gold_tags(rows: list[Row], text: str, label: str, label2id: dict[str, int], source: Path) -> list[list[str]]:
    id2label = {i: name for name, i in label2id.items()}
    gold = []
    for number, row in enumerate(rows, 1):
        tags = row[label]
        if not isinstance(tags, (list, tuple)):
            raise DataError(f"data {source} row {number}: column {label!r} holds {str(tags)[:40]!r}, not a "
                            "list of tags per word; store tags as lists (jsonl, parquet or a saved dataset)")
        words = split_words(row[text])
        if len(tags) != len(words):
            raise DataError(f"data {source} row {number}: {len(tags)} tags for {len(words)} words in "
                            f"{text!r}; give one tag per word")
        names = [id2label.get(int(t)) if isinstance(t, int) or str(t).isdigit() else str(t) for t in tags]
        unknown = sorted({str(t) for t, n in zip(tags, names, strict=True) if n is None or n not in label2id})
        if unknown:
            raise DataError(f"data {source} row {number}: tags {unknown[:5]} are not in the model's id2label "
                            f"{sorted(label2id)}; fix the data or the model config")
        gold.append([n for n in names if n is not None])  # none is None: the check above
    return gold


def _gold_answers(rows: list[Row], context_column: str, label: str, source: Path) -> list[list[str]]:
    """Answers as a string, a list of strings, or SQuAD's {"text": [...], "answer_start": [...]}."""
    gold = []
    for number, row in enumerate(rows, 1):
        value = row[label]
        answers = value.get("text") if isinstance(value, dict) else value
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        context = str(row[context_column])
        if not answers or not all(isinstance(a, str) and a and a in context for a in answers):
            raise DataError(f"data {source} row {number}: answer {str(value)[:60]!r} in column {label!r} is "
                            f"not found in its context; each answer must be a non-empty span of {context_column!r}")
        gold.append(answers)
    return gold


def make_eval_set(source: Path, rows: list[Row], encoder: Encoder, batch_size: int,
                  label2id: dict[str, int], task: str) -> EvalSet:
    """Evaluation rows in batches; with `padding: longest` the rows are ordered by length first,
    so each batch is padded only as far as its own rows need."""
    columns = encoder.columns
    if encoder.padding == "longest":
        rows = encoder.by_length(rows)
    return EvalSet(
        source=source, rows=rows, batches=list(encoder.batches(rows, batch_size)),
        labels=gold_labels(rows, columns, label2id, task, source), columns=columns,
        fingerprint=fingerprint(rows),
    )


def prepare(spec: DataSpec, tokenizer, label2id: dict[str, int], task: str,
            calibration_padding: Padding = "max_length", encode_fitting: bool = True) -> PreparedData:
    """Load both sources, draw disjoint seeded calibration, tuning and evaluation rows, check
    labels and tokenize for `task`."""
    cal_spec, eval_spec = spec.calibration, spec.evaluation
    encoding = task_spec(task).encoding
    cal_raw = load_rows(cal_spec.path, cal_spec.encoding)
    cal_columns = source_columns(spec, cal_spec, list(cal_raw[0].keys()))
    require_columns(cal_raw, cal_columns.needed(), cal_spec.path)
    eval_columns = source_columns(spec, eval_spec)
    eval_raw = _load(eval_spec.path, eval_columns, eval_spec.encoding)
    splits = disjoint_splits(
        Side(cal_raw, cal_columns, cal_spec.path), Side(eval_raw, eval_columns, eval_spec.path),
        cal_spec.samples, spec.tuning_samples, eval_spec.samples, spec.seed, spec.sampling,
    )
    # `calibration_padding` is the policy's (`pipeline.parity.policy.calibration_padding`): max_length
    # unless the calibrator can take batches of different lengths.
    calibration_encoder = Encoder(tokenizer, cal_columns, spec.max_length, calibration_padding, encoding)
    calibration_rows = (calibration_encoder.by_length(splits.calibration) if calibration_padding == "longest"
                        else splits.calibration)
    # Wrong labels in calibration rows are as wrong as in evaluation rows.
    gold_labels(splits.calibration, cal_columns, label2id, task, cal_spec.path)
    encoder = Encoder(tokenizer, eval_columns, spec.max_length, spec.padding, encoding)
    # Tuning rows are compared per row, like evaluation rows, so they are padded (and ordered) alike.
    tuning_encoder = Encoder(tokenizer, cal_columns, spec.max_length, spec.padding, encoding)
    tuning_rows = tuning_encoder.by_length(splits.tuning) if spec.padding == "longest" else splits.tuning
    return PreparedData(
        calibration=Split.of(cal_spec.path, calibration_rows, calibration_encoder, spec.batch_size, encode_fitting),
        tuning=Split.of(cal_spec.path, tuning_rows, tuning_encoder, spec.batch_size, encode_fitting),
        evaluation=make_eval_set(eval_spec.path, splits.evaluation, encoder, spec.batch_size, label2id, task),
    )


def load_sample(path: Path, columns: Columns, samples: int | None, seed: int, what: str,
                encoding: str | None = None, exclude: frozenset[str] = frozenset()) -> list[Row]:
    """Rows of one source for a standalone command: all usable rows, or a seeded sample, leaving
    out rows whose `row_digest` is in `exclude`."""
    rows = [r for r in usable_rows(_load(path, columns, encoding), columns) if row_digest(columns, r) not in exclude]
    if samples is None:
        return rows
    return sample_rows(rows, samples, columns, seed, "stratified", path, what)
