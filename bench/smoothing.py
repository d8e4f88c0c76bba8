"""Does activation smoothing help INT8? Each form with and without it, measured in one run.

    python bench/smoothing.py recipes/minilm-tweets.yaml [--alpha 0.5] [--set key=value ...]

Exports the recipe's model (and prunes it as the recipe says), then quantizes it in every INT8 form
of the recipe twice, without and with `stages.quantize.smoothing` (pipeline/stages/quantize/smooth.py), each
time both with every node quantized and with the recipe's float fallback. Prints per variant: the
agreement with PyTorch on the recipe's evaluation rows, the nodes the fallback kept in float, and
batch-32 throughput at sequence 64 on 2 threads relative to the unsmoothed variant. The fallback
still chooses on tuning rows only; the evaluation rows only judge.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.encode import Encoder, load_tokenizer  # noqa: E402
from pipeline.artifacts import Artifact  # noqa: E402
from pipeline.parity.runners import OrtRunner  # noqa: E402
from pipeline.parity.tasks import collect  # noqa: E402
from pipeline.parity.timing import SEQ, THREADS, measure_all  # noqa: E402
from pipeline.progress import Progress  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.run.cache import CachedStages  # noqa: E402
from pipeline.run.context import RunInputs  # noqa: E402
from pipeline.run.workflow import prune_stages  # noqa: E402
from pipeline.stages import export  # noqa: E402
from pipeline.stages.quantize import stage as quantize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    recipe = load_recipe(args.recipe, tuple(args.overrides))
    inputs = RunInputs.of(recipe)
    prepared, task = inputs.prepared, inputs.task
    evaluation = prepared.evaluation
    reference = collect(inputs.gating.torch, evaluation.batches, task)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exported = export.run(recipe.model.path, work / "model.onnx", recipe.stages.export, evaluation.batches[:2],
                              inputs.gating.torch, task)
        source: Artifact = exported.artifacts[0]
        if recipe.stages.prune.enabled:
            from pipeline.run.cache import StageCache

            _, source = prune_stages(inputs, source, CachedStages(StageCache(None), work), work, Progress())
        rows = []
        for fmt in recipe.stages.quantize.formats:
            for fallback in (0, recipe.stages.quantize.fallback.max_nodes):
                for smoothed in (False, True):
                    spec = recipe.stages.quantize.model_copy(deep=True)
                    spec.fallback.max_nodes = fallback
                    spec.smoothing.formats = [fmt] if smoothed else []
                    spec.smoothing.alpha = args.alpha
                    out = work / f"{fmt}-{fallback}-{smoothed}.onnx"
                    options = quantize.quantize_to(source.path, out, fmt, spec, prepared.calibration.batches,
                                                   prepared.tuning.batches, task)
                    got = collect(OrtRunner(out, THREADS), evaluation.batches, task)
                    rows.append((fmt, fallback, smoothed, task.agreement_rate(reference, got, evaluation.batches),
                                 len(options["float_nodes"]), out))
        encoder = Encoder(load_tokenizer(recipe.model.path, task.spec.encoding), evaluation.columns, SEQ, "max_length",
                          task.spec.encoding)
        batch32 = encoder.encode(evaluation.rows[:32])
        timings = measure_all([OrtRunner(r[-1], THREADS) for r in rows], {k: v[:1] for k, v in batch32.items()},
                              batch32, rounds=3)
    print(f"recipe {args.recipe} ({source.kind} source) | alpha {args.alpha} | agreement with PyTorch on "
          f"{len(evaluation.rows)} evaluation rows | batch-32 throughput, sequence {SEQ}, {THREADS} threads")
    header = f"{'form':5s} {'max float':>9s} {'smoothed':>8s} {'agreement':>9s} {'kept float':>10s} {'seq/s':>8s} {'x':>5s}"
    print(header)
    print("-" * len(header))
    for i, (fmt, fallback, smoothed, agreement, kept, _) in enumerate(rows):
        base = timings[i - 1].b32_per_s if smoothed else timings[i].b32_per_s
        print(f"{fmt:5s} {fallback:9d} {str(smoothed).lower():>8s} {agreement:9.4f} {kept:10d} "
              f"{timings[i].b32_per_s:8.1f} {timings[i].b32_per_s / base:5.2f}")


if __name__ == "__main__":
    main()
