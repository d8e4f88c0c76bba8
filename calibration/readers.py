"""Adapters from tokenized batches to what quantizers consume."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def restrict_inputs(batches: Iterable[Batch], input_names: Sequence[str]) -> list[Batch]:
    """Keep only the inputs a graph declares (an export may drop token_type_ids)."""
    return [{k: v for k, v in b.items() if k in input_names} for b in batches]


def uniform_batches(batches: list[Batch]) -> list[Batch]:
    """The batches as they are if all have one shape, else one row each.

    ORT's entropy and percentile calibrators stack every batch's outputs into one array, which
    fails when the last batch is smaller or sequence lengths differ.
    """
    shapes = {tuple(v.shape for v in b.values()) for b in batches}
    if len(shapes) <= 1:
        return batches
    return [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]


def ort_calibration_reader(batches: Iterable[Batch], input_names: Sequence[str], uniform: bool = True) -> Any:
    """An ONNX Runtime `CalibrationDataReader` over the batches (made uniform unless the
    calibrator takes any shapes, as MinMax does), rewindable."""
    from onnxruntime.quantization import CalibrationDataReader

    class _BatchReader(CalibrationDataReader):
        def __init__(self) -> None:
            kept = restrict_inputs(batches, input_names)
            self._batches = uniform_batches(kept) if uniform else kept
            self._next = 0

        def get_next(self) -> Batch | None:
            if self._next >= len(self._batches):
                return None
            self._next += 1
            return self._batches[self._next - 1]

        def rewind(self) -> None:
            self._next = 0

        def __len__(self) -> int:
            return len(self._batches)

    return _BatchReader()
