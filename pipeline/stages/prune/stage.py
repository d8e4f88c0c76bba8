"""The prune stage: structured pruning on the ONNX graph (FFN neurons, attention heads, optional
2:4 sparsity) into a smaller graph, its config and its plan.

Written here because no tool prunes an exported BERT in ONNX: the blocks are found by structure
(`pipeline.graph.bert`), scored on calibration data (`scores`) and physically sliced (`surgery`),
so the pruned model is smaller and faster on any runtime, not just masked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.artifacts import Artifact, StageResult, atomic_file
from pipeline.graph.bert import AttentionBlock, FfnBlock, Graph, check_blocks, find_attention_blocks, find_ffn_blocks
from pipeline.graph.proof import drop_shape_annotations, prove_runs
from pipeline.graph.rewrites import shared_weights, unfold_gemms, untie_identities
from pipeline.parity.policy import stamp
from pipeline.recipe import PruneSpec
from pipeline.stages.prune.plan import PruningPlan, plan_path
from pipeline.stages.prune.scores import PruneError, Scores, plan_ffn, plan_heads, score
from pipeline.stages.prune.surgery import apply

Batch = dict[str, np.ndarray]


def blocks_of(model: onnx.ModelProto, source: Path,
              config: dict[str, Any] | None = None) -> tuple[list[FfnBlock], list[AttentionBlock]]:
    """Find the blocks of `model`, after making it ready for surgery in place: constants forwarded
    through Identity untied, onnxsim's Reshape-Gemm-Reshape projections unfolded, stale shape
    annotations dropped. Refuses shared weights and blocks
    that contradict `config`."""
    shared = shared_weights(model)
    if shared:
        family = "ALBERT shares one set of layer weights" if (config or {}).get("model_type") == "albert" \
            else f"{len(shared)} weight matrices are shared between layers"
        raise PruneError(f"ONNX file {source}: {family}, so removing a unit from one layer would remove it "
                         "from all; Shipyard does not prune such models: disable pruning for it")
    untie_identities(model)
    unfold_gemms(model)
    drop_shape_annotations(model)
    g = Graph(model)
    ffn, attention = find_ffn_blocks(g), find_attention_blocks(g)
    if not ffn or not attention or len(ffn) != len(attention):
        raise PruneError(
            f"ONNX file {source}: BERT blocks not found ({len(ffn)} FFN, {len(attention)} attention); "
            "prune an unfused FP32 export from shipyard export"
        )
    problems = check_blocks(g, ffn, attention, config or {})
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise PruneError(f"ONNX file {source}: the blocks found do not match config.json ({problems[0]}{more}); "
                         "pass the folder of the model this graph was exported from")
    return ffn, attention


def pruned_config(config: dict[str, Any], ffn_keep: dict[int, np.ndarray],
                  heads_remove: dict[int, list[int]], sparse: list[str]) -> dict[str, Any]:
    """config.json for the pruned model: HF's `pruned_heads`, and the per-layer sizes."""
    out = dict(config)
    sizes = sorted({len(k) for k in ffn_keep.values()})
    if len(sizes) == 1:
        out["intermediate_size"] = sizes[0]
    out["pruned_heads"] = {str(layer): heads for layer, heads in heads_remove.items()}
    out["shipyard_pruning"] = {
        "intermediate_sizes": [len(ffn_keep[layer]) for layer in sorted(ffn_keep)],
        "num_attention_heads_per_layer": [
            config.get("num_attention_heads", 0) - len(heads_remove.get(layer, [])) for layer in sorted(ffn_keep)
        ],
        "sparse_24_weights": sparse,
    }
    return out


def run(src: Artifact, spec: PruneSpec, out_path: Path, calibration_batches: list[Batch],
        model_config: dict[str, Any], agreement_of: Callable[[Path, PruningPlan], float] | None = None,
        seen_rows: Sequence[str] = ()) -> StageResult:
    """Prune `src` into `out_path` (+ config.json and sparsity record beside it).

    `agreement_of(path, plan)` measures a candidate on the tuning rows for the budget search (after
    recovering it along `plan` when the budget says so);
    `seen_rows` (digests of the calibration and tuning rows) are recorded in the pruned graph."""
    started = time.perf_counter()
    model = onnx.load(str(src.path))
    ffn, attention = blocks_of(model, src.path, model_config)
    needs_scores = spec.ffn_fraction > 0 or spec.heads_per_layer > 0 or spec.budget is not None
    if needs_scores and not calibration_batches:
        raise PruneError("scored pruning needs calibration data: pass --calibration DATA --tokenizer DIR")
    num_heads = {b.layer: b.num_heads for b in attention}
    scores = score(model, calibration_batches, ffn, attention, spec.compensate) if needs_scores else Scores(
        {b.layer: np.zeros(b.size) for b in ffn}, {layer: np.zeros(n) for layer, n in num_heads.items()}, {}, {})
    heads_remove = plan_heads(scores.heads, spec.heads_per_layer, spec.heads, num_heads)
    compensation = scores if needs_scores and spec.compensate else None

    def build(fraction: float):
        keep = plan_ffn(scores.ffn, fraction, spec.ffn_scope)
        return keep, *apply(model, ffn, attention, keep, heads_remove, spec.sparsity_24, compensation)

    trials: list[dict[str, float]] = []
    fraction = spec.ffn_fraction
    with atomic_file(out_path) as tmp:
        if spec.budget is not None:
            if agreement_of is None:
                raise PruneError("a prune budget chooses on tuning rows; set data.tuning_samples above 0")
            fraction = _search_fraction(build, tmp, agreement_of, spec, trials)
        keep, pruned, sparse, plan = build(fraction)
        stamp(pruned, "pruned", seen_rows)
        onnx.save(pruned, str(tmp))
        prove_runs(tmp, f"prune {out_path}")
    config = pruned_config(model_config, keep, heads_remove, sparse)
    config_path = out_path.with_name(out_path.stem + ".config.json")
    with atomic_file(config_path) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    plan_file = plan_path(out_path)
    with atomic_file(plan_file) as tmp:
        tmp.write_text(plan.to_json())
    artifact = Artifact(
        name="model.pruned", path=out_path, format="onnx", precision="fp32", stage="prune", kind="pruned",
        options={
            "source_sha256": src.sha256, "ffn_fraction": fraction, "ffn_scope": spec.ffn_scope,
            "intermediate_sizes": config["shipyard_pruning"]["intermediate_sizes"],
            "heads_removed": {str(k): v for k, v in heads_remove.items()},
            "sparsity_24": spec.sparsity_24, "sparse_24_weights": sparse,
            "bias_compensation": compensation is not None,
            "config": config_path.name, "plan": plan_file.name, "budget_trials": trials,
        },
    )
    kept = sum(len(k) for k in keep.values())
    total = sum(b.size for b in ffn)
    return StageResult(
        stage="prune", artifacts=[artifact], seconds=time.perf_counter() - started,
        message=(f"FFN {kept}/{total} neurons, heads removed {sum(map(len, heads_remove.values()))}, "
                 f"{artifact.size_bytes / 1e6:.1f} MB from {src.size_bytes / 1e6:.1f} MB"),
        details={"config": config_path.name, "plan": plan_file.name, "ffn_fraction": fraction,
                 "budget_trials": trials}, files=[config_path, plan_file],
    )


def _search_fraction(build, tmp: Path, agreement_of, spec: PruneSpec, trials: list) -> float:
    """Largest FFN fraction (bisection in [0, max_fraction]) whose agreement meets the budget."""
    budget = spec.budget
    if budget is None:
        raise PruneError("no prune budget to search: set stages.prune.budget")

    def passes(fraction: float) -> bool:
        _, pruned, _, plan = build(fraction)
        onnx.save(pruned, str(tmp))
        agreement = agreement_of(tmp, plan)
        trials.append({"ffn_fraction": fraction, "agreement": agreement})
        return agreement >= budget.min_agreement

    lo, hi = 0.0, budget.max_fraction
    if passes(hi):
        return hi
    if not passes(lo):
        return lo  # even the heads/sparsity alone miss the budget: the gate will say so
    for _ in range(budget.steps):
        mid = round((lo + hi) / 2, 4)
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo
