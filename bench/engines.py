"""Engine latency and throughput on a GPU host, per optimization profile, against PyTorch on the same GPU.

    python bench/engines.py shipped/minilm-tweets          # a collected release (or a run with engines)
    python bench/engines.py release engines/a100-int8      # a release and engine folders

For every TensorRT engine in the folders, and for each of its optimization profiles: latency
(median) at the profile's smallest batch (batch 1 where the profile takes it) and throughput at
its largest batch, sequence 64 (clamped into the profile), each with its speed-up over PyTorch
FP32 on the same GPU at the same batch, and the engine's accuracy and agreement with PyTorch on the
release's evaluation rows. The table has bench/latency.py's columns. Timings are end to end as a
service sees them (host-to-device copies, execution on the runner's stream, device-to-host).
Machines are noisy: compare ratios within one run.

Needs TensorRT and a CUDA device (the Dockerfile's image on a GPU host); it has not been run on a
GPU by the project yet, so docs/benchmarks.md's engine table waits for the first GPU host's output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import SEQ  # noqa: E402

from calibration.encode import Encoder, load_tokenizer  # noqa: E402
from calibration.sampling import Columns  # noqa: E402
from pipeline.errors import ShipyardError  # noqa: E402
from pipeline.inputs import data as datamod  # noqa: E402
from pipeline.inputs.model import inspect_model  # noqa: E402
from pipeline.parity.engine import TrtRunner, pad_batch  # noqa: E402
from pipeline.parity.tasks import collect  # noqa: E402
from pipeline.recipe import Recipe  # noqa: E402
from pipeline.release.signing import engine_trust  # noqa: E402
from pipeline.stages.build import build_environment  # noqa: E402
from pipeline.tasks import task_spec  # noqa: E402


class CudaTorchRunner:
    """The reference model in FP32 on the GPU, timed end to end like the engines."""

    def __init__(self, model_dir: Path, task: str) -> None:
        import torch
        import transformers


        auto = getattr(transformers, task_spec(task).auto_class)
        self.model = auto.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32,
                                          trust_remote_code=False, use_safetensors=True).eval().cuda()
        self.task = task
        import inspect

        self.accepts = set(inspect.signature(self.model.forward).parameters)

    def infer(self, batch):
        import torch

        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v).cuda() for k, v in batch.items() if k in self.accepts})
        torch.cuda.synchronize()
        return {name: getattr(out, name).float().cpu().numpy() for name in task_spec(self.task).outputs}


def engines_in(folders: list[Path]) -> tuple[list[tuple[str, Path, int, str]], Any]:
    """The engines the release folders list, each folder verified first (every file's sha256, no
    path that is absolute or leaves the folder): an engine is code, and only a listed one runs."""
    from pipeline.release.signing import read_verified

    found, manifests = [], []
    for folder in folders:
        verified = read_verified(folder)
        if verified.problems:
            raise SystemExit(f"{folder} does not verify ({verified.problems[0]}); not running its engines")
        manifests.append(verified.intact())
        for art in verified.intact().artifacts:  # the manifest that was verified, not read again
            if art.format == "tensorrt-engine":
                found.append((art.name, folder / art.path, art.size_bytes, art.sha256))
    return found, manifests[0]


def median_ms(call, repeats: int = 30) -> float:
    """Median wall time of `call` in ms, after two warm-up calls."""
    call()
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="release and engine folders (manifest.json in each)")
    args = parser.parse_args()
    try:
        env = build_environment()
    except ShipyardError as missing:
        sys.exit(f"bench/engines.py: {missing}")
    engines, manifest = engines_in(args.folders)
    if not engines:
        sys.exit(f"no TensorRT engines in {', '.join(map(str, args.folders))}; build them with shipyard engines")

    recipe = Recipe.model_validate(manifest.recipe)  # the first folder's manifest, as verified
    info = inspect_model(recipe.model.path, recipe.model.task)
    task = info.task(recipe.model.max_answer_tokens, recipe.thresholds.min_cosine)
    tokenizer = load_tokenizer(recipe.model.path, task.spec.encoding)
    evaluation = datamod.prepare(recipe.data, tokenizer, info.label2id, task.name).evaluation
    if evaluation.fingerprint != manifest["data"]["evaluation"]["fingerprint"]:
        sys.exit("the evaluation rows differ from the release's (data changed?)")
    encoder = Encoder(tokenizer, Columns(recipe.data.text_column, recipe.data.text_pair_column), SEQ, "max_length",
                      task.spec.encoding)
    rows = encoder.encode(evaluation.rows[:max(64, min(len(evaluation.rows), 256))])
    torch_runner = CudaTorchRunner(recipe.model.path, task.name)
    reference = collect(torch_runner, evaluation.batches, task)
    labelled = evaluation.labels is not None and task.spec.kind == "class"

    print(f"{env.gpu_name} ({env.arch}), TensorRT {env.trt_version} | per profile: latency at its smallest batch "
          f"and throughput at its largest, sequence {SEQ} (clamped into the profile), against PyTorch FP32 on this "
          f"GPU | accuracy and agreement with PyTorch on {len(evaluation.rows)} evaluation rows")
    header = (f"{'model':40s} {'MB':>6s} {'batch':>5s} {'b-min ms':>8s} {'x':>5s} {'b-max':>5s} {'seq/s':>9s} "
              f"{'x':>5s} {'accuracy':>8s} {'agree':>6s}")
    print(header)
    print("-" * len(header))

    def batch_of(size: int, sequence: int) -> dict:
        base = {k: v[:size] if len(v) >= size else v.repeat(-(-size // len(v)), axis=0)[:size]
                for k, v in rows.items()}
        return pad_batch({k: v[:, :sequence] for k, v in base.items()}, size, sequence)

    if labelled:
        accuracy = float((task.predictions(reference, evaluation.batches) == evaluation.labels).mean())
    else:
        accuracy = float("nan")
    print(f"{'PyTorch FP32 (GPU)':40s} {'-':>6s} {'':>5s} {'':>8s} {'':>5s} {'':>5s} {'':>9s} {'':>5s} "
          f"{accuracy:8.4f} {1.0:6.4f}")
    for name, path, size, sha256 in engines:
        # Host code only for what the verified release records as built version-compatible, and
        # only the bytes with the verified sha256 are deserialized.
        runner = TrtRunner(path, engine_trust(path).host_code, sha256)
        outputs = collect(runner, evaluation.batches, task)
        agreement = task.agreement_rate(reference, outputs, evaluation.batches)
        accuracy = (float((task.predictions(outputs, evaluation.batches) == evaluation.labels).mean())
                    if labelled else float("nan"))
        for index, profile in enumerate(runner.profiles()):
            (bmin, bmax), (smin, smax) = profile.batch, profile.sequence
            sequence = min(max(SEQ, smin), smax)
            small, large = batch_of(bmin, sequence), batch_of(bmax, sequence)
            trt_small = median_ms(lambda r=runner, i=index, b=small: r.run_profile(i, b))
            trt_large = median_ms(lambda r=runner, i=index, b=large: r.run_profile(i, b), 10)
            torch_small = median_ms(lambda b=small: torch_runner.infer(b))
            torch_large = median_ms(lambda b=large: torch_runner.infer(b), 10)
            print(f"{f'{name} profile {index}':40s} {size / 1e6:6.1f} {bmin:5d} {trt_small:8.2f} "
                  f"{torch_small / trt_small:5.2f} {bmax:5d} {bmax / trt_large * 1000:9.1f} "
                  f"{torch_large / trt_large:5.2f} {accuracy:8.4f} {agreement:6.4f}")


if __name__ == "__main__":
    main()
