"""The speed gate and the release's CPU form: an INT8 CPU artifact that is not faster than the
float graph it was made from is not worth shipping, and a run says so instead of shipping it.

Every CPU INT8 artifact of the run (`model.int8.cpu` on ONNX Runtime, `model.int8.openvino` on
OpenVINO) is timed together with its float source (the FP32, pruned or recovered graph, on ONNX
Runtime: the float artifact the release ships) on this machine (`pipeline.parity.timing`:
interleaved rounds after a warm-up, batch 1 and a calibration batch padded to data.max_length,
never an evaluation row).
`thresholds.int8.min_speedup` (1.0 unless a recipe says otherwise; null turns it off) is applied
to the lowest speed-up any round measured, at either batch size: the ratio's lower bound over the
rounds. `on_slow: fail` fails the run naming both figures; `keep_float` removes that artifact and
says so. The fastest CPU artifact left (by the geometric mean of its two speed-ups), or the float
source when none is, is the release's CPU form (`Manifest.cpu_form`): what `shipyard predict` runs
and the report names, with every figure, the CPU's model and kernel flags and the threads.

The verdict is never taken from the stage cache: a timing is this machine's, with its load, now.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pipeline.artifacts import Artifact, StageResult
from pipeline.parity.timing import THREADS, measure_all
from pipeline.recipe.schema import Gate

CPU_INT8 = ("model.int8.cpu", "model.int8.openvino")


def speed_gate(artifacts: list[Artifact], source: Artifact, gate: Gate, batch: dict
               ) -> tuple[list[StageResult], dict[str, Any]]:
    """Time `artifacts` against `source`, apply `gate.min_speedup`, and choose the CPU form
    (module docstring); returns one result per artifact and the CPU form's record."""
    from pipeline.parity.runners import runner_for
    from pipeline.release.manifest import cpu_kernel_features, machine
    from pipeline.runtimes import runtime

    record: dict[str, Any] = {"cpu": machine().cpu, "cpu_flags": cpu_kernel_features(), "threads": THREADS,
                              "source": source.name, "min_speedup": gate.min_speedup}
    if gate.min_speedup is None and len(artifacts) < 2:  # nothing to gate, nothing to choose between
        chosen = artifacts[0] if artifacts else source
        return [], {**record, "artifact": chosen.name, "runtime": runtime(chosen.format).name,
                    "why": "the only CPU INT8 artifact; not timed (thresholds.int8.min_speedup is null)"}
    started = time.perf_counter()
    batch1 = {k: v[:1] for k, v in batch.items()}
    rows = len(next(iter(batch.values())))
    runners = [runner_for(source.path, source.format, threads=THREADS)]
    runners += [runner_for(a.path, a.format, threads=THREADS) for a in artifacts]
    base, *timings = measure_all(runners, batch1, batch, rounds=3)
    seconds = (time.perf_counter() - started) / max(len(artifacts), 1)
    results, figures, kept = [], [], []
    for artifact, timed in zip(artifacts, timings, strict=True):
        b1, b32 = timed.speedup(base)
        lowest = min(timed.speedup_range(base)[0])
        passed = gate.min_speedup is None or lowest >= gate.min_speedup
        kept_float = not passed and gate.on_slow == "keep_float"
        name = runtime(artifact.format).name
        text = (f"{artifact.name} ({name}) runs {b1:.2f}x / {b32:.2f}x as fast as {source.name} at batch 1 / {rows} "
                f"(lowest round {lowest:.2f}x) on this CPU ({cpu_kernel_features()}, {THREADS} threads)")
        if gate.min_speedup is not None:
            text += f"; thresholds.int8.min_speedup is {gate.min_speedup:g}"
        if kept_float:
            text += f"; removed (on_slow: keep_float): the release ships no {artifact.name}"
        elif not passed:
            text += "; the speed gate failed"
        figures.append({"artifact": artifact.name, "runtime": name, "b1_ms": timed.b1_ms, "batch_per_s": timed.b32_per_s,
                        "speedup": [b1, b32], "lowest_round": lowest, "passed": passed})
        results.append(StageResult(
            stage=f"speed[{artifact.name}]", passed=passed or kept_float, message=text, seconds=seconds,
            details={"speedup": [b1, b32], "lowest_round": lowest, "min_speedup": gate.min_speedup,
                     "source": source.name, "cpu": cpu_kernel_features(), "threads": THREADS,
                     "kept_float": kept_float, "batch_rows": rows}))
        if passed:
            kept.append((math.prod((b1, b32)), artifact))
    chosen = max(kept, key=lambda pair: pair[0])[1] if kept else source
    why = ("the fastest CPU INT8 artifact" + (" passing the speed gate" if gate.min_speedup is not None else "")
           if kept else "no CPU INT8 artifact passed the speed gate: the float graph")
    record.update({"artifact": chosen.name, "runtime": runtime(chosen.format).name, "why": why,
                   "batch_rows": rows, "float_source": {"b1_ms": base.b1_ms, "batch_per_s": base.b32_per_s},
                   "candidates": figures})
    return results, record
