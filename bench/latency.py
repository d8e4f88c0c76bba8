"""Latency and throughput of every artifact of a release, measured in one run.

    python bench/latency.py release/minilm-tweets [--cpu-candidates]

Prints batch-1 latency (median) and batch-32 throughput at sequence length 64 with 2 threads for
PyTorch FP32 and each ONNX artifact on ONNX Runtime's CPU provider, each with its speed-up over
PyTorch, its accuracy and its prediction agreement with PyTorch on the release's evaluation rows
(drawn again from the recipe and checked against the manifest's fingerprint). Machines here are noisy: compare the
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


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.encode import Encoder, load_tokenizer  # noqa: E402
from calibration.sampling import Columns  # noqa: E402
from pipeline import data as datamod  # noqa: E402
from pipeline.model import inspect_model  # noqa: E402
from pipeline.recipe import Recipe  # noqa: E402
from pipeline.runners import OrtRunner, TorchRunner  # noqa: E402
from pipeline.tasks import collect  # noqa: E402

THREADS = 2
SEQ = 64


def time_calls(runner, batch, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.infer(batch)
        times.append(time.perf_counter() - started)
    return times


def measure_all(runners, batch1, batch32, rounds: int = 5) -> list[tuple[float, float]]:
    """Median batch-1 latency (ms) and batch-32 throughput (seq/s) per runner, measured in
    interleaved rounds so that a slow spell of the machine hits every model alike."""
    b1: list[list[float]] = [[] for _ in runners]
    b32: list[list[float]] = [[] for _ in runners]
    for runner in runners:  # warm-up: sessions built, caches filled
        time_calls(runner, batch1, 3)
        time_calls(runner, batch32, 1)
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            b1[i] += time_calls(runner, batch1, 12)
            b32[i] += time_calls(runner, batch32, 2)
    return [(statistics.median(a) * 1000, 32 / statistics.median(b)) for a, b in zip(b1, b32)]


def cpu_candidates(fp32: Path, work: Path) -> dict[str, Path]:
    """The INT8 forms considered for the CPU artifact, built from the release's FP32 model
    (unpruned, all nodes quantized: the release's own cpu artifact adds pruning and fallback)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fused = work / "fused.onnx"
    optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0).save_model_to_file(str(fused))
    out = {"candidate: fused FP32": fused}
    for name, src, per_channel, ops in [
        ("unfused dynamic per-channel", fp32, True, None),
        ("fused dynamic per-tensor, all ops", fused, False, None),
        ("fused dynamic per-channel, no embeddings", fused, True, ["MatMul", "Attention"]),
    ]:
        path = work / (name.replace(" ", "_").replace(",", "") + ".onnx")
        quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=ops,
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
    recipe = Recipe.model_validate(manifest["recipe"])
    model_dir = recipe.model.path
    info = inspect_model(model_dir, recipe.model.task)
    task = info.task(recipe.model.max_answer_tokens, recipe.thresholds.min_cosine)
    tokenizer = load_tokenizer(model_dir, task.name)
    evaluation = datamod.prepare(recipe.data, tokenizer, info.label2id, task.name).evaluation
    if evaluation.fingerprint != manifest["data"]["evaluation"]["fingerprint"]:
        sys.exit("the evaluation rows differ from the release's (data changed?); rerun shipyard run")
    encoder = Encoder(tokenizer, Columns(recipe.data.text_column, recipe.data.text_pair_column), SEQ, "max_length",
                      task.name)
    batch32 = encoder.encode(evaluation.rows[:32])
    batch1 = {k: v[:1] for k, v in batch32.items()}

    entries = [("PyTorch FP32", TorchRunner(model_dir, THREADS, task.name), None)]
    for art in manifest["artifacts"]:
        entries.append((art["path"], OrtRunner(args.release / art["path"], THREADS), art["size_bytes"]))
    with tempfile.TemporaryDirectory() as tmp:
        if args.cpu_candidates:
            fp32 = next(args.release / a["path"] for a in manifest["artifacts"] if a["name"] == "model.fp32")
            for name, path in cpu_candidates(fp32, Path(tmp)).items():
                entries.append((name, OrtRunner(path, THREADS), path.stat().st_size))

        print(f"release {args.release} | batch-1 latency and batch-32 throughput, sequence {SEQ}, "
              f"{THREADS} threads | accuracy and agreement with PyTorch on {len(evaluation.rows)} evaluation rows")
        header = (f"{'model':40s} {'MB':>6s} {'b1 ms':>7s} {'b1 x':>5s} {'b32 seq/s':>9s} {'b32 x':>5s} "
                  f"{'accuracy':>8s} {'agree':>6s}")
        print(header)
        print("-" * len(header))
        base = reference = None
        timings = measure_all([runner for _, runner, _ in entries], batch1, batch32)
        for (name, runner, size), (latency, throughput) in zip(entries, timings):
            base = base or (latency, throughput)
            outputs = collect(runner, evaluation.batches, task)
            reference = outputs if reference is None else reference
            labelled = evaluation.labels is not None and task.name == "text-classification"
            predicted = task.predictions(outputs, evaluation.batches)
            accuracy = float((predicted == evaluation.labels).mean()) if labelled else float("nan")
            agreement = task.agreement_rate(reference, outputs, evaluation.batches)
            size_text = f"{size / 1e6:.1f}" if size else "-"
            print(f"{name:40s} {size_text:>6s} {latency:7.2f} {base[0] / latency:5.2f} "
                  f"{throughput:9.1f} {throughput / base[1]:5.2f} {accuracy:8.4f} {agreement:6.4f}")


if __name__ == "__main__":
    main()
