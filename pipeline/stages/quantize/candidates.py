"""Choosing a CPU format's graph form by measurement on the machine that builds it.

Which INT8 form runs fastest depends on the CPU: on an AVX2 core ONNX Runtime's fused graph with
dynamic INT8 won, on an AVX-512 VNNI core the unfused per-tensor graph (Optimum's form) and
OpenVINO's static INT8 did (issue #32's table). So a format names candidates
(`stages.quantize.cpu_forms`, `openvino_forms`); each is quantized with the float fallback
(`sensitivity.search`), and those left are timed together with their float source in interleaved
rounds (`pipeline.parity.timing`) on a calibration batch padded to its longest row, never an
evaluation row. The fastest (by
the geometric mean of its batch-1 and full-batch speed-ups) among those that meet the fallback's
agreement target on the tuning rows ships; if none does, the one that agrees best, and the parity
gate decides. Every candidate's figures, the winner and the CPU are recorded in the artifact's
options; a candidate its runtime cannot compile or run (OpenVINO 2026.4 refuses ONNX Runtime's
Q/DQ graph of an onnxsim-simplified ModernBERT) is recorded with the reason and left out. With
one candidate nothing is timed (the speed gate still times what ships).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.runtimes import ArtifactFormat
from pipeline.stages.quantize.sensitivity import Quantize, Trial

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Quantizer:
    """What a form makes in its folder: the float graph the fallback ranks and compares with, and
    quantize(excluded) -> artifact path under each of its settings, in the order the fallback tries
    them with no node in float (`sensitivity.settle`; most forms have one), and the options to record."""

    graph: Path
    settings: dict[str, Quantize]
    options: dict[str, Any]

    @classmethod
    def one(cls, graph: Path, quantize: Quantize, options: dict[str, Any]) -> Quantizer:
        """A form with no settings to try."""
        return cls(graph, {"default": quantize}, options)


@dataclass(frozen=True)
class Form:
    """One candidate: its name, the runtime it ships for, and how to make its quantizer in a folder."""

    name: str
    runtime: ArtifactFormat
    make: Callable[[Path], Quantizer]


@dataclass
class Tried:
    """A candidate after its fallback search: the artifact it chose and what it measured."""

    form: Form
    path: Path
    excluded: list[str]
    trials: list[Trial]
    chosen: Trial
    options: dict[str, Any]

    @property
    def agreement(self) -> float:
        return self.chosen.agreement


def choose(tried: list[Tried], float_source: Path, min_agreement: float, batch: Batch, isa: str | None,
           failed: list[dict[str, str]] | None = None) -> tuple[Tried, dict[str, Any]]:
    """The candidate that ships and the record of the choice (module docstring); `failed`: the
    candidates whose runtime could not run what they made, recorded with the reason."""
    from pipeline.parity.runners import OrtRunner, runner_for
    from pipeline.parity.timing import THREADS, measure_all
    from pipeline.release.manifest import cpu_kernel_features, machine

    passing = [t for t in tried if not math.isnan(t.agreement) and t.agreement >= min_agreement]
    record: dict[str, Any] = {"cpu": machine().cpu, "cpu_flags": cpu_kernel_features(), "threads": THREADS,
                              "min_agreement": min_agreement, "timed_on": "a calibration batch"}
    if isa is not None:
        here = _has_isa(cpu_kernel_features(), isa)
        record["deploy_isa"] = isa
        record["timings_from"] = "this machine" + ("" if here else f", which lacks {isa}: timed here, not there")
    rows = []
    if len(tried) > 1:
        batch1 = {k: v[:1] for k, v in batch.items()}
        runners = [OrtRunner(float_source, THREADS)] + [runner_for(t.path, t.form.runtime, threads=THREADS)
                                                        for t in tried]
        base, *timings = measure_all(runners, batch1, batch, rounds=3)
        speed = {id(t): timing.speedup(base) for t, timing in zip(tried, timings, strict=True)}
        for t, timing in zip(tried, timings, strict=True):
            rows.append({"form": t.form.name, "runtime": t.form.runtime, **_setting(t), "float_nodes": len(t.excluded),
                         "agreement": t.agreement, "b1_ms": timing.b1_ms, "batch_per_s": timing.b32_per_s,
                         "speedup": list(timing.speedup(base))})
        pool = passing or tried
        winner = max(pool, key=lambda t: math.prod(speed[id(t)]) if passing else t.agreement)
        record["float_source"] = {"b1_ms": base.b1_ms, "batch_per_s": base.b32_per_s}
        record["batch_rows"] = len(next(iter(batch.values())))
    else:
        winner = tried[0]
        rows.append({"form": winner.form.name, "runtime": winner.form.runtime, **_setting(winner),
                     "float_nodes": len(winner.excluded),
                     "agreement": winner.agreement})
    record["candidates"] = rows + list(failed or [])
    record["chosen"] = winner.form.name
    record["why"] = ("the only candidate" if len(tried) == 1 else "fastest of those meeting the agreement target"
                     if passing else "none met the agreement target: the one agreeing best")
    return winner, record


def _setting(tried: Tried) -> dict[str, str]:
    """The setting a candidate chose, for a form with several (`Quantizer.settings`)."""
    return {"setting": tried.chosen.setting} if tried.chosen.setting else {}


def _has_isa(flags: str, isa: str) -> bool:
    wanted = {"avx2": {"avx2"}, "avx512_vnni": {"avx512_vnni"}, "amx": {"amx_int8", "amx_tile"}}[isa]
    return wanted <= set(flags.split(":")[-1].split(","))
