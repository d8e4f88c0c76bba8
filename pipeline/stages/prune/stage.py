"""The prune stage: structured pruning on the ONNX graph (FFN neurons, attention heads, optional
2:4 sparsity) into a smaller graph, its config and its plan.

Written here because no tool prunes an exported BERT in ONNX: the blocks are found by structure
(`pipeline.graph.bert`), scored on calibration data (`scores`) and physically sliced (`surgery`),
so the pruned model is smaller and faster on any runtime, not just masked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from pipeline.artifacts import Artifact, StageResult, atomic_file
from pipeline.families import config_size, family_of
from pipeline.graph import model as graph_model
from pipeline.graph.attention import AttentionBlock, find_attention_blocks
from pipeline.graph.bert import FfnBlock, Graph, check_blocks, find_ffn_blocks
from pipeline.graph.model import drop_shape_annotations
from pipeline.graph.proof import prove_runs
from pipeline.graph.rewrites import shared_weights, unfold_gemms, untie_constants
from pipeline.parity.policy import stamp
from pipeline.recipe import PruneSpec
from pipeline.stages.prune.plan import PruningPlan, plan_path
from pipeline.stages.prune.scores import PruneError, Scores, plan_ffn, plan_heads, score
from pipeline.stages.prune.surgery import apply

Batch = dict[str, np.ndarray]


def blocks_of(model: ir.Model, source: Path,
              config: dict[str, Any] | None = None) -> tuple[list[FfnBlock], list[AttentionBlock]]:
    """Find the blocks of `model`, after making it ready for surgery in place: constants forwarded
    through Identity or read directly untied, onnxsim's Reshape-Gemm-Reshape projections unfolded, stale shape
    annotations dropped. Refuses shared weights and blocks
    that contradict `config`."""
    shared = shared_weights(model)  # read before untying: untie_constants leaves shared weights alone
    untie_constants(model)
    unfold_gemms(model)
    drop_shape_annotations(model)
    g = Graph(model)
    ffn, attention = find_ffn_blocks(g), find_attention_blocks(g, config_size(config or {}, "num_attention_heads"))
    standard = graph_model.standard_attention_nodes(model)
    if len(standard) > len({b.context for b in attention} & {n.outputs[0].name for n in standard}):
        raise PruneError(f"ONNX file {source}: {len(standard)} standard ONNX Attention nodes take Q, K and V in a form "
                         "whose heads Shipyard cannot slice (it slices the 4-D form torch.onnx's dynamo exporter "
                         "writes); prune the graph shipyard export (Optimum) makes of the same model")
    # A family that loses heads needs its attention blocks found; one that prunes FFN neurons only
    # needs its FFN blocks, and no weight of theirs shared.
    heads = "heads" in family_of(config or {}).pruning
    # DeBERTa reads its query and key weights twice in one layer (content and positions): not shared between layers.
    shared = {name: n for name, n in shared.items() if n != 1 + sum(
        role == own_role for b in attention for own_role, (own, _) in (("q", b.q), ("k", b.k)) if own == name
        for role, _ in b.position_projections)}
    if shared and (heads or set(shared) & {name for b in ffn for name in (b.w1, b.w2)}):
        raise PruneError(f"ONNX file {source}: {len(shared)} weight matrices are shared between layers, so removing "
                         "a unit from one layer would remove it from all; Shipyard does not prune such models: "
                         "disable pruning for it")
    if not ffn or (heads and (not attention or len(ffn) != len(attention))):
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


def slice_masked_heads(model: ir.Model, plan: PruningPlan, config: dict[str, Any], source: Path) -> ir.Model:
    """`model` (an export of a model whose heads the plan masked, `torch_heads`) with those heads
    sliced out: their output-projection columns are zero, so this is the same function, smaller."""
    ffn, attention = blocks_of(model, source, config)
    heads = {p.layer: p.heads_removed for p in plan.layers if p.heads_removed}
    keep = {b.layer: np.arange(b.size) for b in ffn}
    pruned, _, _ = apply(model, ffn, attention, keep, heads, "none")
    return pruned


def refuse_what_the_family_cannot_take(spec: PruneSpec, config: dict[str, Any], source: Path) -> None:
    """A request for units the model's family cannot lose exactly (`pipeline.families`) is refused,
    naming why, before any graph is read."""
    family = family_of(config)
    if not family.pruning:
        raise PruneError(f"ONNX file {source}: {family.not_prunable}; disable pruning for this model")
    if "heads" not in family.pruning and (spec.heads_per_layer > 0 or spec.heads):
        raise PruneError(f"ONNX file {source}: {family.not_prunable}; prune FFN neurons only (no heads)")
    if "ffn" not in family.pruning and (spec.ffn_fraction > 0 or spec.budget is not None):
        raise PruneError(f"ONNX file {source}: {family.not_prunable}; prune heads only (no FFN neurons)")


def pruned_config(config: dict[str, Any], ffn_keep: dict[int, np.ndarray],
                  heads_remove: dict[int, list[int]], sparse: list[str]) -> dict[str, Any]:
    """config.json for the pruned model: HF's `pruned_heads` (where transformers prunes the family's
    heads), and the per-layer sizes (read and
    written under the family's own keys, `pipeline.families`)."""
    out = dict(config)
    sizes = sorted({len(k) for k in ffn_keep.values()})
    if len(sizes) == 1:
        out[family_of(config).key("intermediate_size")] = sizes[0]
    if family_of(config).torch_heads == "prune_heads":  # transformers would prune a masked family's and fail
        out["pruned_heads"] = {str(layer): heads for layer, heads in heads_remove.items()}
    heads = config_size(config, "num_attention_heads")
    out["shipyard_pruning"] = {
        "intermediate_sizes": [len(ffn_keep[layer]) for layer in sorted(ffn_keep)],
        "num_attention_heads_per_layer": [heads - len(heads_remove.get(layer, [])) for layer in sorted(ffn_keep)],
        "sparse_24_weights": sparse,
    }
    return out


@dataclass
class Pruner:
    """An FP32 graph made ready for surgery, its blocks found and its units scored once: each
    candidate FFN fraction is a pure build from it. The prune stage writes one; the run's budget
    search (`pipeline.run.searches`) measures several and then writes the one it chose."""

    src: Artifact
    spec: PruneSpec
    model: ir.Model
    ffn: list[FfnBlock]
    attention: list[AttentionBlock]
    scores: Scores
    heads_remove: dict[int, list[int]]
    compensation: Scores | None
    model_config: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)  # the stage's time includes the scoring

    @classmethod
    def of(cls, src: Artifact, spec: PruneSpec, calibration_batches: list[Batch],
           model_config: dict[str, Any]) -> Pruner:
        refuse_what_the_family_cannot_take(spec, model_config, src.path)
        model = graph_model.load(src.path)
        ffn, attention = blocks_of(model, src.path, model_config)
        needs_scores = spec.ffn_fraction > 0 or spec.heads_per_layer > 0 or spec.budget is not None
        if needs_scores and not calibration_batches:
            raise PruneError("scored pruning needs calibration data: pass --calibration DATA --tokenizer DIR")
        num_heads = {b.layer: b.num_heads for b in attention}
        scores = score(model, calibration_batches, ffn, attention, spec.compensate) if needs_scores else Scores(
            {b.layer: np.zeros(b.size) for b in ffn}, {layer: np.zeros(n) for layer, n in num_heads.items()}, {}, {})
        heads_remove = plan_heads(scores.heads, spec.heads_per_layer, spec.heads, num_heads)
        compensation = scores if needs_scores and spec.compensate else None
        return cls(src, spec, model, ffn, attention, scores, heads_remove, compensation, model_config)

    def build(self, fraction: float) -> tuple[dict[int, np.ndarray], ir.Model, list[str], PruningPlan]:
        keep = plan_ffn(self.scores.ffn, fraction, self.spec.ffn_scope, self.spec.ffn_multiple)
        return keep, *apply(self.model, self.ffn, self.attention, keep, self.heads_remove, self.spec.sparsity_24,
                            self.compensation)

    def candidate(self, fraction: float, path: Path) -> PruningPlan:
        """Write the graph pruned at `fraction` to `path` (a trial, not an artifact); its plan."""
        _, pruned, _, plan = self.build(fraction)
        graph_model.save(pruned, path)
        return plan

    def write(self, fraction: float, out_path: Path, seen_rows: Sequence[str] = (),
              trials: Sequence[dict[str, float]] = ()) -> StageResult:
        """The pruned graph at `fraction` into `out_path`, its config.json and plan beside it; the
        budget search's `trials` (if any) are recorded with it."""
        started = self.started
        src, spec, heads_remove = self.src, self.spec, self.heads_remove
        with atomic_file(out_path) as tmp:
            keep, pruned, sparse, plan = self.build(fraction)
            stamp(pruned, "pruned", seen_rows)
            graph_model.save(pruned, tmp, graph_model.external_data_name(out_path))
            prove_runs(tmp, f"prune {out_path}")
        config = pruned_config(self.model_config, keep, heads_remove, sparse)
        config_path = out_path.with_name(out_path.stem + ".config.json")
        with atomic_file(config_path) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")
        plan_file = plan_path(out_path)
        with atomic_file(plan_file) as tmp:
            tmp.write_text(plan.to_json())
        artifact = Artifact(
            name="model.pruned", path=out_path, format="onnx", precision="fp32", stage="prune", from_pruned=True,
            options={
                "source_sha256": src.sha256, "ffn_fraction": fraction, "ffn_scope": spec.ffn_scope,
                "intermediate_sizes": config["shipyard_pruning"]["intermediate_sizes"],
                "heads_removed": {str(k): v for k, v in heads_remove.items()},
                "sparsity_24": spec.sparsity_24, "sparse_24_weights": sparse,
                "bias_compensation": self.compensation is not None,
                "config": config_path.name, "plan": plan_file.name, "budget_trials": list(trials),
            },
        )
        kept = sum(len(k) for k in keep.values())
        total = sum(b.size for b in self.ffn)
        return StageResult(
            stage="prune", artifacts=[artifact], seconds=time.perf_counter() - started,
            message=(f"FFN {kept}/{total} neurons, heads removed {sum(map(len, heads_remove.values()))}, "
                     f"{artifact.size_bytes / 1e6:.1f} MB from {src.size_bytes / 1e6:.1f} MB"),
            details={"config": config_path.name, "plan": plan_file.name, "ffn_fraction": fraction,
                     "budget_trials": list(trials)}, files=[config_path, plan_file],
        )


def run(src: Artifact, spec: PruneSpec, out_path: Path, calibration_batches: list[Batch],
        model_config: dict[str, Any], seen_rows: Sequence[str] = ()) -> StageResult:
    """Prune `src` at `spec.ffn_fraction` into `out_path` (+ config.json and plan beside it);
    `seen_rows` (digests of the calibration and tuning rows) are recorded in the pruned graph. A
    budget is searched by the run (`pipeline.run.searches`), which calls `Pruner` itself."""
    return Pruner.of(src, spec, calibration_batches, model_config).write(spec.ffn_fraction, out_path, seen_rows)
