"""Timing runners the way every speed figure of Shipyard is measured: `shipyard bench`, and the
benchmark scripts in bench/ (one module, so a ratio means the same everywhere).

Batch-1 latency (median, ms) and batch-32 throughput (sequences/s), measured in interleaved
rounds after a warm-up, so a slow spell of the machine hits every runner alike. Each round's
median is kept too: the spread of a ratio across rounds is how sure it is. Machines differ in
their vector units and are noisy: compare ratios from one run, never absolute figures across runs.

Each runner's calls start after a pause (`SETTLE_S`): ONNX Runtime's and PyTorch's thread pools
keep spinning for a while after their last call, and on a 2-core machine the runner timed next
shared the cores with them. Measured on a 2-core AVX-512 VNNI EPYC: an OpenVINO IR timed right
after an ONNX Runtime graph took 5.21 ms at batch 1, where an IR of equal speed timed after an
OpenVINO runner took 4.14 ms; with the pause 4.39 ms and 4.28 ms.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

THREADS = 2
SEQ = 64
SETTLE_S = 0.1  # the pause before each runner's calls (module docstring)


@dataclass(frozen=True)
class Timing:
    b1_ms: float  # median batch-1 latency over every call of every round
    b32_per_s: float  # batch-32 sequences per second from the median call
    b1_rounds: tuple[float, ...]  # each round's median batch-1 latency (ms)
    b32_rounds: tuple[float, ...]  # each round's batch-32 sequences per second

    def speedup(self, base: Timing) -> tuple[float, float]:
        """(batch-1, batch-32) speed-up over `base`."""
        return base.b1_ms / self.b1_ms, self.b32_per_s / base.b32_per_s

    def speedup_range(self, base: Timing) -> tuple[tuple[float, float], tuple[float, float]]:
        """The lowest and highest per-round (batch-1, batch-32) speed-ups over `base`: how much the
        ratio moved while it was measured."""
        b1 = [b / s for s, b in zip(self.b1_rounds, base.b1_rounds, strict=True)]
        b32 = [s / b for s, b in zip(self.b32_rounds, base.b32_rounds, strict=True)]
        return (min(b1), min(b32)), (max(b1), max(b32))


def time_calls(runner, batch, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.infer(batch)
        times.append(time.perf_counter() - started)
    return times


def measure_all(runners, batch1, batch32, rounds: int = 5) -> list[Timing]:
    """The `Timing` of each runner (module docstring), measured together."""
    b1: list[list[list[float]]] = [[] for _ in runners]
    b32: list[list[list[float]]] = [[] for _ in runners]
    for runner in runners:  # warm-up: sessions built, caches filled
        time_calls(runner, batch1, 3)
        time_calls(runner, batch32, 1)
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            time.sleep(SETTLE_S)
            b1[i].append(time_calls(runner, batch1, 12))
            time.sleep(SETTLE_S)
            b32[i].append(time_calls(runner, batch32, 2))
    size = len(next(iter(batch32.values())))
    timings = []
    for ones, thirty_twos in zip(b1, b32, strict=True):
        every_one = [t for round_ in ones for t in round_]
        every_32 = [t for round_ in thirty_twos for t in round_]
        timings.append(Timing(statistics.median(every_one) * 1000, size / statistics.median(every_32),
                              tuple(statistics.median(r) * 1000 for r in ones),
                              tuple(size / statistics.median(r) for r in thirty_twos)))
    return timings


def at_length(batch: dict, length: int) -> dict:
    """`batch` with every token input padded to `length` positions (zeros: masked padding), so a
    CPU artifact is timed at the sequence length it will serve, not at one short batch's."""
    import numpy as np

    return {name: np.pad(value, ((0, 0), (0, max(length - value.shape[1], 0)))) if value.ndim == 2 else value
            for name, value in batch.items()}
