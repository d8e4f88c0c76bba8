"""Latency and throughput of every artifact of one or more releases, measured in one run.

    python bench/latency.py release/minilm-tweets [release/minilm-tweets-compact ...] [--optimum]
                            [--cpu-candidates] [--all]

Prints batch-1 latency (median) and batch-32 throughput at sequence length 64 with 2 threads for
PyTorch FP32 and each ONNX artifact on ONNX Runtime's CPU provider, each with its speed-up over
PyTorch, its accuracy and its prediction agreement with PyTorch on the evaluation rows (drawn
again from the first release's recipe and checked against every manifest's fingerprint; the
releases must share model and evaluation rows). Machines here are noisy: compare the ratios
within one run, not absolute numbers across runs.

- `--optimum` adds Optimum's dynamic-INT8 artifact of the unpruned model, made the way its
  documentation shows (`ORTModelFor….from_pretrained(export=True)`, `ORTQuantizer`,
  `AutoQuantizationConfig.<this CPU's ISA>(is_static=False, per_channel=False)`).
- `--cpu-candidates` also measures the INT8 forms the `cpu` artifact was chosen among (see
  pipeline/stages/quantize/stage.py).
- The TensorRT-ready ONNX (`model.trt.*`) is for GPUs and is left out unless `--all`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.encode import Encoder, load_tokenizer  # noqa: E402
from calibration.sampling import Columns  # noqa: E402
from pipeline.inputs import data as datamod  # noqa: E402
from pipeline.inputs.model import inspect_model  # noqa: E402
from pipeline.parity.runners import OrtRunner, TorchRunner  # noqa: E402
from pipeline.parity.tasks import collect  # noqa: E402
from pipeline.parity.timing import SEQ, THREADS, measure_all  # noqa: E402
from pipeline.recipe import Recipe  # noqa: E402
from pipeline.run.bench import optimum_dynamic_int8  # noqa: E402


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
    parser.add_argument("releases", type=Path, nargs="+", help="folders written by shipyard run")
    parser.add_argument("--optimum", action="store_true", help="add Optimum's dynamic INT8 of the unpruned model")
    parser.add_argument("--cpu-candidates", action="store_true")
    parser.add_argument("--all", action="store_true", help="include the TensorRT-ready ONNX (model.trt.*)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    for release in args.releases:
        if not (release / "manifest.json").is_file():
            parser.error(f"{release}/manifest.json not found; make the release first (shipyard run RECIPE --out {release})")
    manifests = {release: json.loads((release / "manifest.json").read_text()) for release in args.releases}
    first = manifests[args.releases[0]]
    recipe = Recipe.model_validate(first["recipe"])
    model_dir = recipe.model.path
    info = inspect_model(model_dir, recipe.model.task)
    task = info.task(recipe.model.max_answer_tokens, recipe.thresholds.min_cosine)
    tokenizer = load_tokenizer(model_dir, task.spec.encoding)
    evaluation = datamod.prepare(recipe.data, tokenizer, info.label2id, task.name).evaluation
    for release, manifest in manifests.items():
        if evaluation.fingerprint != manifest["data"]["evaluation"]["fingerprint"]:
            sys.exit(f"{release}: its evaluation rows differ from the first release's (other data, or the data "
                     "changed); compare releases of one model and evaluation sample")
        if manifest["model"]["sha256"] != first["model"]["sha256"]:
            sys.exit(f"{release}: made from another model than {args.releases[0]}; compare releases of one model")
    encoder = Encoder(tokenizer, Columns(recipe.data.text_column, recipe.data.text_pair_column), SEQ, "max_length",
                      task.spec.encoding)
    batch32 = encoder.encode(evaluation.rows[:32])
    batch1 = {k: v[:1] for k, v in batch32.items()}

    entries = [("PyTorch FP32", TorchRunner(model_dir, task=task.name, threads=THREADS), None)]
    for release, manifest in manifests.items():
        prefix = f"{manifest['recipe_name']}/" if len(manifests) > 1 else ""
        for art in manifest["artifacts"]:
            if art["format"] == "onnx" and (args.all or not art["name"].startswith("model.trt.")):
                entries.append((prefix + art["path"], OrtRunner(release / art["path"], THREADS), art["size_bytes"]))
    with tempfile.TemporaryDirectory() as tmp:
        if args.optimum:
            path = optimum_dynamic_int8(model_dir, task.name, Path(tmp))
            entries.append(("Optimum dynamic INT8 (unpruned)", OrtRunner(path, THREADS), path.stat().st_size))
        if args.cpu_candidates:
            release, manifest = next(iter(manifests.items()))
            fp32 = next(release / a["path"] for a in manifest["artifacts"] if a["name"] == "model.fp32")
            for name, path in cpu_candidates(fp32, Path(tmp)).items():
                entries.append((name, OrtRunner(path, THREADS), path.stat().st_size))

        print(f"releases {', '.join(map(str, args.releases))} | batch-1 latency and batch-32 throughput, sequence {SEQ}, "
              f"{THREADS} threads | accuracy and agreement with PyTorch on {len(evaluation.rows)} evaluation rows")
        header = (f"{'model':48s} {'MB':>6s} {'b1 ms':>7s} {'b1 x':>5s} {'b32 seq/s':>9s} {'b32 x':>5s} "
                  f"{'accuracy':>8s} {'agree':>6s}")
        print(header)
        print("-" * len(header))
        base = reference = None
        timings = measure_all([runner for _, runner, _ in entries], batch1, batch32)
        for (name, runner, size), timing in zip(entries, timings, strict=True):
            latency, throughput = timing.b1_ms, timing.b32_per_s
            base = base or (latency, throughput)
            outputs = collect(runner, evaluation.batches, task)
            reference = outputs if reference is None else reference
            labelled = evaluation.labels is not None and task.spec.kind == "class"
            predicted = task.predictions(outputs, evaluation.batches)
            accuracy = float((predicted == evaluation.labels).mean()) if labelled else float("nan")
            agreement = task.agreement_rate(reference, outputs, evaluation.batches)
            size_text = f"{size / 1e6:.1f}" if size else "-"
            print(f"{name:48s} {size_text:>6s} {latency:7.2f} {base[0] / latency:5.2f} "
                  f"{throughput:9.1f} {throughput / base[1]:5.2f} {accuracy:8.4f} {agreement:6.4f}")


if __name__ == "__main__":
    main()
