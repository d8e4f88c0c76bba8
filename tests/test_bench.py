"""`shipyard bench`: every artifact of a release measured on this machine in one run, with its
ratios to PyTorch, its accuracy and agreement, and the CPU it ran on (no timing is asserted:
speeds are reported by the bench, never tested)."""

import json
import shutil

import pytest
from conftest import invoke
from test_faults import assert_clean_failure

pytestmark = pytest.mark.slow


def test_bench_measures_every_cpu_artifact_against_pytorch(tiny_release):
    result = invoke("bench", tiny_release.out, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    rows = {r["name"]: r for r in figures["artifacts"]}
    onnx = {a.name for a in tiny_release.manifest.artifacts if a.format == "onnx" and not a.name.startswith("model.trt.")}
    assert set(rows) == {"PyTorch FP32"} | onnx
    assert rows["PyTorch FP32"]["vs_pytorch"] == [1.0, 1.0] and rows["model.fp32"]["agreement"] == 1.0
    for row in rows.values():
        assert row["b1_ms"] > 0 and row["b32_per_s"] > 0
        low, high = row["vs_pytorch_range"]
        assert low[0] <= high[0] and low[1] <= high[1]
    recorded = {a.name: a.parity["agreement"] for a in tiny_release.manifest.artifacts if a.name in onnx}
    # agreement on the gate's rows, batched as bench batches them, is the gate's to within one row's worth
    assert all(abs(rows[name]["agreement"] - value) <= 2 / figures["evaluation_rows"] for name, value in recorded.items())
    assert figures["cpu"].startswith(("x86_64", "aarch64")) and figures["threads"] == 2


def test_bench_refuses_a_release_that_does_not_verify(tiny_release, tmp_path):
    damaged = tmp_path / "release"
    shutil.copytree(tiny_release.out, damaged)
    (damaged / "report.md").write_text("edited")
    assert_clean_failure(invoke("bench", damaged), "does not verify", "shipyard verify")


def test_bench_with_openvino_adds_openvinos_own_float_and_int8_of_the_export(tiny_release):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e '.[openvino]')")
    result = invoke("bench", tiny_release.out, "--openvino", "--rounds", "2", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["artifacts"]}
    assert json.loads(result.output)["rounds"] == 2  # as asked: more rounds on a noisy machine
    for name in ("OpenVINO FP32 (of model.fp32)", "NNCF INT8 (of model.fp32)"):
        assert rows[name]["runtime"] == "openvino" and rows[name]["b1_ms"] > 0 and rows[name]["size_bytes"] > 0
    assert rows["OpenVINO FP32 (of model.fp32)"]["agreement"] >= 0.99  # the same float graph on another runtime
    # Every row is set against NNCF's INT8 too (the "at least as fast as NNCF" reads off it).
    assert rows["NNCF INT8 (of model.fp32)"]["vs_nncf"] == [1.0, 1.0]
    for row in rows.values():
        (low_b1, low_b32), (high_b1, high_b32) = row["vs_nncf_range"]
        assert low_b1 <= high_b1 and low_b32 <= high_b32 and row["vs_nncf"][0] > 0 and row["vs_optimum"] is None


def test_each_runner_is_timed_after_the_previous_ones_threads_have_settled(monkeypatch):
    """ONNX Runtime's and PyTorch's pools spin after their last call: timed straight after one, a
    runner shared the cores with it (an OpenVINO IR measured 1.26x slower). Every runner's calls
    start at least SETTLE_S after the previous runner's last call."""
    import time

    import numpy as np

    from pipeline.parity import timing

    monkeypatch.setattr(timing, "SETTLE_S", 0.02)
    calls: list[tuple[str, float, float]] = []

    class Recorded:
        def __init__(self, name):
            self.name = name

        def infer(self, batch):
            started = time.perf_counter()
            calls.append((self.name, started, time.perf_counter()))

    batch = {"input_ids": np.zeros((2, 4), np.int64)}
    timings = timing.measure_all([Recorded("a"), Recorded("b")], batch, batch, rounds=2)
    assert len(timings) == 2 and all(t.b1_ms > 0 for t in timings)
    timed = calls[2 * 4:]  # after the warm-up (3 + 1 calls each)
    switches = [(prev, cur) for prev, cur in zip(timed, timed[1:], strict=False) if prev[0] != cur[0]]
    assert switches and all(cur[1] - prev[2] >= 0.02 for prev, cur in switches)
