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
            f"lower {purpose} samples or supply more data"
        )
    rng = random.Random(seed)
    # Per-word tags and answer lists are no classes to stratify on: sample those rows at random.
    scalar = columns.label is not None and not any(isinstance(r[columns.label], (list, tuple, dict)) for r in rows)
    if strategy == "random" or not scalar:
        return rng.sample(rows, n)
    by_label: dict[str, list[Row]] = {}
    for row in rows:
        by_label.setdefault(str(row[columns.label]), []).append(row)
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
class Splits:
    calibration: list[Row]
    evaluation: list[Row]


def disjoint_splits(
    calibration_rows: list[Row],
    evaluation_rows: list[Row],
    calibration_samples: int,
    evaluation_samples: int,
    columns: Columns,
    seed: int,
    strategy: Literal["random", "stratified"],
    calibration_source: Path,
    evaluation_source: Path,
) -> Splits:
    """Calibration first, then evaluation from what is left: no row is in both."""
    calibration = sample_rows(
        usable_rows(calibration_rows, columns), calibration_samples, columns, seed, strategy,
        calibration_source, "calibration",
    )
    taken = {columns.key(r) for r in calibration}
    remaining = [r for r in usable_rows(evaluation_rows, columns) if columns.key(r) not in taken]
    evaluation = sample_rows(
        remaining, evaluation_samples, columns, seed + 1, strategy, evaluation_source, "evaluation"
    )
    return Splits(calibration, evaluation)


def fingerprint(rows: list[Row]) -> str:
    """sha256 of the selected rows in order; equal fingerprints mean the same data was used."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()
