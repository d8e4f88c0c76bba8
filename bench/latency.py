"""Latency and throughput of every artifact of a release, measured in one run.

    python bench/latency.py release/minilm-tweets [--cpu-candidates]

Prints batch-1 latency (median) and batch-32 throughput at sequence length 64 with 2 threads for
PyTorch FP32 and each ONNX artifact on ONNX Runtime's CPU provider, each with its speed-up over
PyTorch and its accuracy from the release's parity check. Machines here are noisy: compare the
ratios within one run, not absolute numbers across runs. `--cpu-candidates` also measures the
INT8 forms the `cpu` artifact was chosen among (see pipeline/stages/quantize.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.encode import Encoder, load_tokenizer  # noqa: E402
from calibration.sampling import Columns  # noqa: E402
from calibration.sources import load_rows  # noqa: E402
from pipeline.runners import OrtRunner, TorchRunner  # noqa: E402

THREADS = 2
SEQ = 64


def time_calls(runner, batch, repeats: int) -> list[float]:
    for _ in range(3):
        runner.infer(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.infer(batch)
        times.append(time.perf_counter() - started)
    return times


def measure(runner, batch1, batch32) -> tuple[float, float]:
    latency_ms = statistics.median(time_calls(runner, batch1, 60)) * 1000
    throughput = 32 / statistics.median(time_calls(runner, batch32, 8))
    return latency_ms, throughput


def cpu_candidates(fp32: Path, work: Path) -> dict[str, Path]:
    """The INT8 forms considered for the CPU artifact, built from the release's FP32 model."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fused = work / "fused.onnx"
    optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0).save_model_to_file(str(fused))
    out = {"candidate: fused FP32": fused}
    for name, src, per_channel in [("unfused dynamic per-channel", fp32, True),
                                   ("fused dynamic per-tensor", fused, False)]:
        path = work / (name.replace(" ", "_") + ".onnx")
        quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8, per_channel=per_channel,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        out[f"candidate: {name}"] = path
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("release", type=Path, help="a folder written by shipyard run")
    parser.add_argument("--cpu-candidates", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    manifest = json.loads((args.release / "manifest.json").read_text())
    data = manifest["recipe"]["data"]
    model_dir = Path(manifest["model"]["path"])
    rows = load_rows(Path(data["evaluation"]["path"]))[:32]
    encoder = Encoder(load_tokenizer(model_dir), Columns(data["text_column"], data["text_pair_column"]),
                      SEQ, "max_length")
    batch32 = encoder.encode(rows)
    batch1 = {k: v[:1] for k, v in batch32.items()}

    entries = [("PyTorch FP32", TorchRunner(model_dir, THREADS), None, None)]
    for art in manifest["artifacts"]:
        entries.append((art["path"], OrtRunner(args.release / art["path"], THREADS), art["parity"],
                        art["size_bytes"]))
    with tempfile.TemporaryDirectory() as tmp:
        if args.cpu_candidates:
            fp32 = next(args.release / a["path"] for a in manifest["artifacts"] if a["name"] == "model.fp32")
            for name, path in cpu_candidates(fp32, Path(tmp)).items():
                entries.append((name, OrtRunner(path, THREADS), None, path.stat().st_size))

        metric = manifest["recipe"]["thresholds"]["metric"]
        reference_metric = manifest["artifacts"][0]["parity"]["reference_metrics"].get(metric)
        print(f"release {args.release} | batch-1 and batch-32, sequence {SEQ}, {THREADS} threads, "
              f"{metric} on {manifest['data']['evaluation']['rows']} evaluation rows")
        header = f"{'model':40s} {'MB':>7s} {'b1 ms':>8s} {'b1 x':>6s} {'b32 seq/s':>10s} {'b32 x':>6s} {metric:>9s}"
        print(header)
        print("-" * len(header))
        base = None
        for name, runner, parity, size in entries:
            latency, throughput = measure(runner, batch1, batch32)
            base = base or (latency, throughput)
            acc = reference_metric if parity is None and name.startswith("PyTorch") else (
                parity["artifact_metrics"].get(metric) if parity else None)
            acc_text = f"{acc:.4f}" if acc is not None else "-"
            size_text = f"{size / 1e6:.1f}" if size else "-"
            print(f"{name:40s} {size_text:>7s} {latency:8.2f} {base[0] / latency:6.2f} "
                  f"{throughput:10.1f} {throughput / base[1]:6.2f} {acc_text:>9s}")


if __name__ == "__main__":
    main()
