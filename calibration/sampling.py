"""Seeded calibration/evaluation splits that never share a row, and their fingerprints.

Rows are keyed by their content (text, text pair); evaluation rows whose key also occurs in the
calibration selection are excluded, so the two splits stay disjoint even when they come from one
file or from two files that overlap.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from calibration.errors import DataError
from calibration.sources import Row


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text, the optional second text and the optional label."""

    text: str = "text"
    text_pair: str | None = None
    label: str | None = None

    def needed(self) -> list[str]:
        return [c for c in (self.text, self.text_pair, self.label) if c]

    def project(self, row: Row) -> Row:
        return {c: row[c] for c in self.needed()}

    def key(self, row: Row) -> str:
        pair = row[self.text_pair] if self.text_pair else None
        return json.dumps([row[self.text], pair], ensure_ascii=False)


def usable_rows(rows: list[Row], columns: Columns) -> list[Row]:
    """Rows with non-empty text (and pair, and label when used), projected to those columns."""
    out = []
    for row in rows:
        values = [row.get(c) for c in columns.needed()]
        if all(v is not None and str(v).strip() != "" for v in values):
            out.append(columns.project(row))
    return out


def sample_rows(
    rows: list[Row],
    n: int,
    columns: Columns,
    seed: int,
    strategy: Literal["random", "stratified"],
    source: Path,
    purpose: str,
) -> list[Row]:
    """Draw `n` rows, seeded; stratified keeps each label's share of the rows (largest remainder)."""
    if len(rows) < n:
        raise DataError(
            f"data {source}: {purpose} asks for {n} rows but only {len(rows)} usable rows are left; "
            f"lower the {purpose.split()[0]} samples or supply more data"
        )
    rng = random.Random(seed)
    # Per-word tags and answer lists are no classes to stratify on: sample those rows at random.
    label = columns.label
    scalar = label is not None and not any(isinstance(r[label], (list, tuple, dict)) for r in rows)
    if strategy == "random" or label is None or not scalar:
        return rng.sample(rows, n)
    by_label: dict[str, list[Row]] = {}
    for row in rows:
        by_label.setdefault(str(row[label]), []).append(row)
    labels = sorted(by_label)
    quotas = {lab: n * len(by_label[lab]) / len(rows) for lab in labels}
    counts = {lab: int(quotas[lab]) for lab in labels}
    leftover = n - sum(counts.values())
    for lab in sorted(labels, key=lambda lab: quotas[lab] - counts[lab], reverse=True)[:leftover]:
        counts[lab] += 1
    picked = [row for lab in labels for row in rng.sample(by_label[lab], counts[lab])]
    rng.shuffle(picked)
    return picked


@dataclass(frozen=True)
class Side:
    """One data source as a split draws from it: its usable rows, columns and how many to draw."""

    rows: list[Row]
    columns: Columns
    source: Path


@dataclass(frozen=True)
class Splits:
    calibration: list[Row]
    tuning: list[Row]
    evaluation: list[Row]


def disjoint_splits(
    calibration: Side,
    evaluation: Side,
    calibration_samples: int,
    tuning_samples: int,
    evaluation_samples: int,
    seed: int,
    strategy: Literal["random", "stratified"],
) -> Splits:
    """Calibration rows, then tuning rows from the rest of the calibration source, then evaluation
    rows from what neither took (by content key, so one file or two overlapping files both work)."""
    usable = usable_rows(calibration.rows, calibration.columns)
    cal = sample_rows(usable, calibration_samples, calibration.columns, seed, strategy, calibration.source,
                      "calibration")
    taken = {calibration.columns.key(r) for r in cal}
    rest = [r for r in usable if calibration.columns.key(r) not in taken]
    tuning = sample_rows(rest, tuning_samples, calibration.columns, seed + 2, strategy, calibration.source,
                         "tuning (drawn after the calibration rows)") if tuning_samples else []
    taken |= {calibration.columns.key(r) for r in tuning}
    remaining = [r for r in usable_rows(evaluation.rows, evaluation.columns) if evaluation.columns.key(r) not in taken]
    evaluation_rows = sample_rows(remaining, evaluation_samples, evaluation.columns, seed + 1, strategy,
                                  evaluation.source, "evaluation (after the calibration and tuning rows)")
    return Splits(cal, tuning, evaluation_rows)


def row_digest(columns: Columns, row: Row) -> str:
    """A short content digest of a row's key, recorded in artifacts so that a later standalone
    `validate` can leave out the rows an artifact was calibrated or tuned on."""
    return hashlib.sha256(columns.key(row).encode()).hexdigest()[:16]


def fingerprint(rows: list[Row]) -> str:
    """sha256 of the selected rows in order; equal fingerprints mean the same data was used."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()
