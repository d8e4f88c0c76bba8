"""The speed gate: a CPU INT8 artifact that is not faster than the float graph it was made from
is not worth shipping, and a run says so instead of shipping it without a word.

With `thresholds.int8.min_speedup`, the run times the CPU INT8 artifact against its float source
(the FP32, pruned or recovered graph) on this machine (`pipeline.run.timing`: interleaved rounds,
batch 1 and the evaluation's first batch), and gates the lowest speed-up any round measured, at
either batch size. `on_slow: fail` fails the run naming the figures; `keep_float` removes the
INT8 artifact and records that the float graph is the release's CPU form. The verdict is never
taken from the stage cache: a timing is this machine's, with its load, now; the record names
the CPU's kernel flags and the threads.
"""

from __future__ import annotations

import time

from pipeline.artifacts import Artifact, StageResult
from pipeline.recipe.schema import Gate
from pipeline.run.timing import THREADS, measure_all


def speed_gate(artifact: Artifact, source: Artifact, gate: Gate, batch32: dict) -> StageResult:
    """Time `artifact` against `source` and apply `gate.min_speedup` (module docstring)."""
    from pipeline.parity.runners import OrtRunner
    from pipeline.release.manifest import cpu_kernel_features

    started = time.perf_counter()
    assert gate.min_speedup is not None
    batch1 = {k: v[:1] for k, v in batch32.items()}
    base, timed = measure_all([OrtRunner(source.path, THREADS), OrtRunner(artifact.path, THREADS)], batch1, batch32,
                              rounds=3)
    b1, b32 = timed.speedup(base)
    lowest = min(timed.speedup_range(base)[0])
    rows = len(next(iter(batch32.values())))
    figures = (f"{artifact.name} runs {b1:.2f}x / {b32:.2f}x as fast as {source.name} at batch 1 / {rows} "
               f"(lowest round {lowest:.2f}x) on this CPU ({cpu_kernel_features()}, {THREADS} threads); "
               f"thresholds.int8.min_speedup is {gate.min_speedup:g}")
    passed = lowest >= gate.min_speedup
    kept_float = not passed and gate.on_slow == "keep_float"
    message = figures + ("" if passed else "; kept float: the release ships no INT8 CPU artifact, its CPU form is "
                         f"{source.path.name}" if kept_float else "; the speed gate failed")
    return StageResult(
        stage=f"speed[{artifact.name}]", passed=passed or kept_float, message=message,
        seconds=time.perf_counter() - started,
        details={"speedup": [b1, b32], "lowest_round": lowest, "min_speedup": gate.min_speedup,
                 "source": source.name, "cpu": cpu_kernel_features(), "threads": THREADS, "kept_float": kept_float})
