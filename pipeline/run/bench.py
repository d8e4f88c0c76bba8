"""`shipyard bench RELEASE`: every artifact's speed and parity on this machine, in one run.

For PyTorch FP32, each CPU artifact of a verified release on its own runtime (ONNX Runtime,
OpenVINO; the TensorRT-ready ONNX only with `include_trt`: it is for GPUs), with `openvino`
OpenVINO's own FP32 IR and NNCF INT8 of the FP32 export (what an OpenVINO user makes without
Shipyard) and, with `optimum`, Optimum's dynamic INT8 of the same model (made
as its quantization guide shows): batch-1 latency and batch-32 throughput at sequence 64 with 2
threads (`pipeline.parity.timing`), each ratio to PyTorch, to Optimum's and to NNCF's (with the
lowest and highest per-round ratio in the JSON: how much it moved), and the accuracy and
agreement with PyTorch on the release's evaluation rows, drawn again from its recipe and checked
against its fingerprint. The CPU's kernel flags are printed with the figures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import ShipyardError
from pipeline.parity.timing import SEQ, THREADS, measure_all

NNCF_NAME = "NNCF INT8 (of model.fp32)"


def optimum_dynamic_int8(model_dir: Path, task: str, work: Path) -> Path:
    """Optimum's dynamic INT8 of the unpruned model, as its quantization guide makes it (per-tensor,
    the config for this CPU's instruction set)."""
    import optimum.onnxruntime as ort
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from pipeline.release.manifest import cpu_kernel_features
    from pipeline.tasks import task_spec

    model = getattr(ort, task_spec(task).ort_class).from_pretrained(str(model_dir), export=True)
    flags = cpu_kernel_features().partition(":")[2].split(",")
    isa = "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"
    config = getattr(AutoQuantizationConfig, isa)(is_static=False, per_channel=False)
    ORTQuantizer.from_pretrained(model).quantize(save_dir=work / "optimum", quantization_config=config)
    return next((work / "optimum").glob("*quantized.onnx"))


def openvino_references(fp32_onnx: Path, calibration: list[dict], work: Path) -> list[tuple[str, Path]]:
    """What an OpenVINO user would make of the FP32 export without Shipyard: its FP32 IR, and
    NNCF's static INT8 of it with NNCF's defaults (transformer preset) on the recipe's calibration
    rows; [(name, IR path)]."""
    import nncf
    import openvino as ov

    from pipeline.stages.quantize.openvino import quiet_nncf

    model = ov.convert_model(str(fp32_onnx))
    names = [port.get_any_name() for port in model.inputs]
    ov.save_model(model, str(work / "ov-fp32.xml"), compress_to_fp16=False)
    dataset = nncf.Dataset(calibration, lambda batch: {k: v for k, v in batch.items() if k in names})
    with quiet_nncf():
        quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    ov.save_model(quantized, str(work / "ov-nncf.xml"), compress_to_fp16=False)
    return [("OpenVINO FP32 (of model.fp32)", work / "ov-fp32.xml"), (NNCF_NAME, work / "ov-nncf.xml")]


def bench(release: Path, optimum: bool = False, include_trt: bool = False, openvino: bool = False,
          rounds: int = 5) -> dict[str, Any]:
    """The figures of every artifact of `release` (module docstring)."""
    import torch

    from calibration.encode import Encoder, load_tokenizer
    from calibration.sampling import Columns
    from pipeline.inputs import data as datamod
    from pipeline.inputs.model import inspect_model
    from pipeline.parity.runners import OrtRunner, TorchRunner, runner_for
    from pipeline.parity.tasks import collect
    from pipeline.recipe import Recipe
    from pipeline.release import serving
    from pipeline.release.manifest import cpu_kernel_features
    from pipeline.runtimes import require, runtime

    release = Path(release)
    manifest = serving.intact(release, "bench measures").intact()
    recipe = Recipe.model_validate(manifest.recipe)
    model_dir = recipe.model.path
    if not Path(model_dir).is_dir():
        raise ShipyardError(f"release {release}: its model folder {model_dir} is not on this machine; bench compares "
                            "every artifact with PyTorch and needs it")
    torch.set_num_threads(THREADS)
    info = inspect_model(model_dir, recipe.model.task, recipe.model.allow_pickle)
    task = info.task(recipe.model.max_answer_tokens, recipe.thresholds.min_cosine)
    tokenizer = load_tokenizer(model_dir, task.spec.encoding)
    prepared = datamod.prepare(recipe.data, tokenizer, info.label2id, task.name)
    evaluation = prepared.evaluation
    if evaluation.fingerprint != manifest.data["evaluation"].fingerprint:
        raise ShipyardError(f"release {release}: its evaluation rows differ from the recipe's now (the data changed); "
                            "bench measures parity on the rows the release was gated on")
    encoder = Encoder(tokenizer, Columns(recipe.data.text_column, recipe.data.text_pair_column), SEQ, "max_length",
                      task.spec.encoding)
    batch32 = encoder.encode(evaluation.rows[:32])
    batch1 = {k: v[:1] for k, v in batch32.items()}
    entries: list[tuple[str, str, Any, int | None]] = [
        ("PyTorch FP32", "torch", TorchRunner(model_dir, task=task.name, threads=THREADS), None)]
    for art in manifest.artifacts:  # each CPU artifact on its own runtime (`pipeline.runtimes`)
        if runtime(art.format).device == "cpu" and (include_trt or not art.name.startswith("model.trt.")):
            require(art.format, f"bench of {art.name}")
            entries.append((art.name, runtime(art.format).name, runner_for(release / art.path, art.format,
                                                                           threads=THREADS), art.size_bytes))
    with tempfile.TemporaryDirectory() as tmp:
        if optimum:
            path = optimum_dynamic_int8(model_dir, task.name, Path(tmp))
            entries.append(("Optimum dynamic INT8", "onnxruntime", OrtRunner(path, THREADS), path.stat().st_size))
        if openvino:
            require("openvino", "bench --openvino")
            fp32 = next(release / a.path for a in manifest.artifacts if a.name == "model.fp32")
            for name, xml in openvino_references(fp32, prepared.calibration.batches, Path(tmp)):
                size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
                entries.insert(len(entries) - int(optimum), (name, "openvino", runner_for(xml, "openvino",
                                                                                          threads=THREADS), size))
        timings = measure_all([runner for _, _, runner, _ in entries], batch1, batch32, rounds)
        nncf = next((timing for (name, *_), timing in zip(entries, timings, strict=True) if name == NNCF_NAME), None)
        reference = collect(entries[0][2], evaluation.batches, task)
        rows = []
        for (name, runtime_name, runner, size), timing in zip(entries, timings, strict=True):
            outputs = reference if runner is entries[0][2] else collect(runner, evaluation.batches, task)
            labelled = evaluation.labels is not None and task.spec.kind == "class"
            accuracy = float((task.predictions(outputs, evaluation.batches) == evaluation.labels).mean()) \
                if labelled else None
            rows.append({"name": name, "runtime": runtime_name, "size_bytes": size, "b1_ms": timing.b1_ms,
                         "b32_per_s": timing.b32_per_s, "vs_pytorch": timing.speedup(timings[0]),
                         "vs_pytorch_range": timing.speedup_range(timings[0]),
                         "vs_optimum": timing.speedup(timings[-1]) if optimum else None,
                         "vs_optimum_range": timing.speedup_range(timings[-1]) if optimum else None,
                         "vs_nncf": timing.speedup(nncf) if nncf else None,
                         "vs_nncf_range": timing.speedup_range(nncf) if nncf else None,
                         "accuracy": accuracy, "agreement": task.agreement_rate(reference, outputs, evaluation.batches)})
    return {"release": str(release), "sequence": SEQ, "threads": THREADS, "rounds": rounds, "cpu": cpu_kernel_features(),
            "evaluation_rows": len(evaluation.rows), "artifacts": rows}


def describe(result: dict[str, Any]) -> str:
    """The figures as a table a person reads."""
    optimum = any(r["vs_optimum"] for r in result["artifacts"])
    nncf = any(r.get("vs_nncf") for r in result["artifacts"])
    lines = [f"{result['release']} | sequence {result['sequence']}, {result['threads']} threads, {result['rounds']} rounds | "
             f"CPU {result['cpu']} | "
             f"accuracy and agreement with PyTorch on {result['evaluation_rows']} evaluation rows",
             f"{'artifact':30s} {'runtime':11s} {'MB':>6s} {'b1 ms':>7s} {'b32 seq/s':>9s} {'x PyTorch b1/b32':>17s}"
             + (f" {'x Optimum b1/b32':>17s}" if optimum else "") + (f" {'x NNCF b1/b32':>13s}" if nncf else "")
             + f" {'accuracy':>8s} {'agree':>6s}"]
    for r in result["artifacts"]:
        size = f"{r['size_bytes'] / 1e6:.1f}" if r["size_bytes"] else "-"
        ratio = f"{r['vs_pytorch'][0]:.2f}x/{r['vs_pytorch'][1]:.2f}x"
        line = f"{r['name']:30s} {r['runtime']:11s} {size:>6s} {r['b1_ms']:7.2f} {r['b32_per_s']:9.1f} {ratio:>17s}"
        if optimum:
            line += f" {r['vs_optimum'][0]:.2f}x/{r['vs_optimum'][1]:.2f}x".rjust(18)
        if nncf:
            line += f" {r['vs_nncf'][0]:.2f}x/{r['vs_nncf'][1]:.2f}x".rjust(14)
        accuracy = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        lines.append(f"{line} {accuracy:>8s} {r['agreement']:6.4f}")
    return "\n".join(lines)
