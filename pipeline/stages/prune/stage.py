"""Structured pruning on the ONNX graph: FFN neurons, attention heads, optional 2:4 sparsity.

Written here because no tool prunes an exported BERT in ONNX: the blocks are found by structure
(`pipeline.graph.bert`), scored on calibration data and physically sliced, so the pruned model
is smaller and faster on any runtime, not just masked.

- FFN neuron score: mean |GELU output| over non-padding tokens times the L2 norm of the
  neuron's W2 row (its contribution to the residual stream).
- Head score: mean over non-padding tokens of ||context_h @ W_o[h]||, the head's contribution
  to the attention output.
- Removing heads slices Q/K/V columns and biases and W_o rows, and patches the head-count and
  all-head-size constants of that layer's Reshapes. Those constants may be shared across layers
  (onnxslim, ORT's basic optimizer), so each layer gets its own clone before it is patched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.artifacts import Artifact, StageResult, atomic_file
from pipeline.errors import ShipyardError
from pipeline.graph.bert import (
    AttentionBlock,
    FfnBlock,
    Graph,
    check_blocks,
    find_attention_blocks,
    find_ffn_blocks,
    shared_weights,
    unfold_gemms,
    untie_identities,
)
from pipeline.graph.proof import drop_dead, drop_shape_annotations, prove_runs
from pipeline.parity.policy import PRUNED_MARK, pruned_mark, stamp
from pipeline.parity.runners import session_with_outputs
from pipeline.recipe import PruneSpec
from pipeline.stages.prune.plan import LayerPlan, PruningPlan, mask_24, plan_path

Batch = dict[str, np.ndarray]


class PruneError(ShipyardError):
    """A pruning request that cannot be applied to this graph."""


# --- scoring -------------------------------------------------------------------------------

@dataclass
class Scores:
    """Per-layer importance of FFN neurons and heads, and their mean outputs for compensation."""

    ffn: dict[int, np.ndarray]
    heads: dict[int, np.ndarray]
    ffn_mean: dict[int, np.ndarray]  # E[GELU output] per neuron
    context_mean: dict[int, np.ndarray]  # E[context] per head, [heads, head_dim]


def score(model: onnx.ModelProto, batches: list[Batch], ffn: list[FfnBlock],
          attention: list[AttentionBlock], compensate: bool) -> Scores:
    """Score neurons and heads on the calibration batches (non-padding tokens only).

    Without compensation a unit's score is its mean contribution magnitude. With it, the unit's
    mean contribution is folded into the next bias when it is removed, so what is lost is only
    its deviation from that mean, and units are scored by that (std instead of mean |.|).
    """
    g = Graph(model)
    tensors = [b.activation for b in ffn] + [b.context for b in attention]
    session = session_with_outputs(model, tensors)
    feeds = {i.name for i in session.get_inputs()}
    acc = {key: {} for key in ("abs", "sum", "sq", "ctx", "norm", "norm_sq")}
    out_heads = {b.layer: g.array(b.out).reshape(b.num_heads, b.head_dim, -1) for b in attention}
    tokens = 0
    for batch in batches:
        mask = batch["attention_mask"].astype(bool)
        tokens += int(mask.sum())
        values = session.run(tensors, {k: v for k, v in batch.items() if k in feeds})
        for block, act in zip(ffn, values[: len(ffn)]):
            a = act[mask].astype(np.float64)  # [tokens, I]
            for key, value in (("abs", np.abs(a).sum(0)), ("sum", a.sum(0)), ("sq", (a * a).sum(0))):
                acc[key][block.layer] = acc[key].get(block.layer, 0) + value
        for block, ctx in zip(attention, values[len(ffn):]):
            c = ctx.transpose(0, 2, 1, 3)[mask].astype(np.float64)  # [tokens, H, d]
            norms = np.linalg.norm(np.einsum("thd,hdo->tho", c, out_heads[block.layer]), axis=-1)
            for key, value in (("ctx", c.sum(0)), ("norm", norms.sum(0)), ("norm_sq", (norms ** 2).sum(0))):
                acc[key][block.layer] = acc[key].get(block.layer, 0) + value
    ffn_scores, head_scores, ffn_mean, context_mean = {}, {}, {}, {}
    for b in ffn:
        mean = acc["sum"][b.layer] / tokens
        spread = np.sqrt(np.maximum(acc["sq"][b.layer] / tokens - mean ** 2, 0)) if compensate else acc["abs"][b.layer] / tokens
        ffn_scores[b.layer] = spread * np.linalg.norm(g.array(b.w2), axis=1)
        ffn_mean[b.layer] = mean
    for b in attention:
        mean = acc["ctx"][b.layer] / tokens  # [H, d]
        if compensate:
            mean_out = np.linalg.norm(np.einsum("hd,hdo->ho", mean, out_heads[b.layer]), axis=-1)
            head_scores[b.layer] = np.sqrt(np.maximum(acc["norm_sq"][b.layer] / tokens - mean_out ** 2, 0))
        else:
            head_scores[b.layer] = acc["norm"][b.layer] / tokens
        context_mean[b.layer] = mean
    return Scores(ffn_scores, head_scores, ffn_mean, context_mean)


def plan_ffn(scores: dict[int, np.ndarray], fraction: float, scope: str) -> dict[int, np.ndarray]:
    """Indices of the neurons to keep per layer (sorted), dropping `fraction` of them."""
    if fraction <= 0:
        return {layer: np.arange(len(s)) for layer, s in scores.items()}
    if scope == "uniform":
        keep = {}
        for layer, s in scores.items():
            n_keep = max(1, int(round(len(s) * (1 - fraction))))
            keep[layer] = np.sort(np.argsort(-s)[:n_keep])
        return keep
    # global: one threshold over scores normalised per layer, and at least 5% kept per layer
    normalised = {layer: s / (s.mean() or 1.0) for layer, s in scores.items()}
    pooled = np.concatenate(list(normalised.values()))
    threshold = np.quantile(pooled, fraction)
    keep = {}
    for layer, s in normalised.items():
        floor = max(1, int(np.ceil(0.05 * len(s))))
        chosen = np.flatnonzero(s > threshold)
        if len(chosen) < floor:
            chosen = np.argsort(-s)[:floor]
        keep[layer] = np.sort(chosen)
    return keep


def plan_heads(scores: dict[int, np.ndarray], per_layer: int, explicit: dict[int, list[int]] | None,
               num_heads: dict[int, int]) -> dict[int, list[int]]:
    """Heads to remove per layer: explicit, or the `per_layer` lowest-scored."""
    if explicit is not None:
        remove = {int(layer): sorted(set(heads)) for layer, heads in explicit.items()}
    else:
        remove = {layer: sorted(np.argsort(s)[:per_layer].tolist()) for layer, s in scores.items()} if per_layer else {}
    for layer, heads in remove.items():
        if layer not in num_heads:
            raise PruneError(f"prune heads: layer {layer} does not exist (layers 0-{max(num_heads)}); fix the layer index")
        bad = [h for h in heads if not 0 <= h < num_heads[layer]]
        if bad:
            raise PruneError(f"prune heads: layer {layer} has heads 0-{num_heads[layer] - 1}, not {bad}; fix the head indices")
        if len(heads) >= num_heads[layer]:
            raise PruneError(f"prune heads: removing all {num_heads[layer]} heads of layer {layer} is not allowed; keep at least one")
    return {layer: heads for layer, heads in remove.items() if heads}


# --- graph surgery -------------------------------------------------------------------------

def _unique(g: Graph, base: str) -> str:
    taken = set(g.init) | set(g.producer)
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _patch_shape(g: Graph, reshape: onnx.NodeProto, index: int, value: int) -> None:
    """Give this Reshape its own shape with element `index` set to `value`."""
    shape = reshape.input[1]
    constant = g.constant_value(shape)
    if constant is not None:
        patched = constant.copy()
        patched[index] = value
        name = _unique(g, f"{shape}_{reshape.name}_pruned")
        g.graph.initializer.append(numpy_helper.from_array(patched, name))
        g.init[name] = g.graph.initializer[-1]
        reshape.input[1] = name
        return
    concat = g.producer[shape]
    part = g.constant_value(concat.input[index])
    clone = onnx.NodeProto()
    clone.CopyFrom(concat)  # shared across layers by some optimizers: patch a clone, never the original
    clone.name = _unique(g, f"{concat.name}_{reshape.name}_pruned")
    clone.output[0] = _unique(g, f"{concat.output[0]}_{reshape.name}_pruned")
    part_name = _unique(g, f"{clone.name}_value")
    g.graph.initializer.append(numpy_helper.from_array(np.full(part.shape, value, dtype=part.dtype), part_name))
    g.init[part_name] = g.graph.initializer[-1]
    clone.input[index] = part_name
    position = next(i for i, n in enumerate(g.graph.node) if n is concat)
    g.graph.node.insert(position + 1, clone)
    g.producer[clone.output[0]] = g.graph.node[position + 1]
    reshape.input[1] = clone.output[0]


def remove_heads(g: Graph, block: AttentionBlock, heads: list[int], context_mean: np.ndarray | None
                 ) -> np.ndarray | None:
    """Slice the heads out; returns the output bias compensation wrote (None: untouched)."""
    keep = [h for h in range(block.num_heads) if h not in heads]
    cols = np.concatenate([np.arange(h * block.head_dim, (h + 1) * block.head_dim) for h in keep])
    folded = None
    if context_mean is not None and block.out_bias is not None:
        w_out = g.array(block.out).reshape(block.num_heads, block.head_dim, -1)
        g.set_array(block.out_bias, g.array(block.out_bias) + sum(context_mean[h] @ w_out[h] for h in heads))
        folded = g.array(block.out_bias)
    for weight, bias in (block.q, block.k, block.v):
        g.set_array(weight, g.array(weight)[:, cols])
        g.set_array(bias, g.array(bias)[cols])
    g.set_array(block.out, g.array(block.out)[cols, :])
    nodes = {n.name: n for n in g.graph.node}
    for name in block.split_reshapes:
        _patch_shape(g, nodes[name], 2, len(keep))
    _patch_shape(g, nodes[block.merge_reshape], 2, len(keep) * block.head_dim)
    return folded


def slice_ffn(g: Graph, block: FfnBlock, keep: np.ndarray, mean: np.ndarray | None) -> np.ndarray | None:
    """Keep the `keep` neurons; returns the W2 bias compensation wrote (None: untouched)."""
    bias = None
    if mean is not None and block.b2 is not None:
        dropped = np.setdiff1d(np.arange(block.size), keep)
        g.set_array(block.b2, g.array(block.b2) + mean[dropped] @ g.array(block.w2)[dropped, :])
        bias = g.array(block.b2)
    g.set_array(block.w1, g.array(block.w1)[:, keep])
    g.set_array(block.b1, g.array(block.b1)[keep])
    g.set_array(block.w2, g.array(block.w2)[keep, :])
    return bias


def sparsify_24(g: Graph, weights: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Keep the 2 largest |w| of every 4 consecutive weights along the reduction axis (rows), by
    the rule the PyTorch side applies too (`pruning_plan.mask_24`); `weights` are (layer, role,
    initializer) and the ones made sparse are returned."""
    done = []
    for layer, role, name in weights:
        w = g.array(name)
        if w.shape[0] % 4:
            continue
        g.set_array(name, w * mask_24(w))
        done.append((layer, role, name))
    return done


# --- the stage -----------------------------------------------------------------------------

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


def apply(model: onnx.ModelProto, ffn: list[FfnBlock], attention: list[AttentionBlock],
          ffn_keep: dict[int, np.ndarray], heads_remove: dict[int, list[int]],
          sparsity: str, compensation: Scores | None = None) -> tuple[onnx.ModelProto, list[str], PruningPlan]:
    """A pruned copy of `model`, the 2:4 weights' names and the plan that does the same to the
    PyTorch model; the input is never modified. With `compensation`, removed units' mean
    contributions are folded into the following bias."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    g = Graph(pruned)
    layers = {b.layer: LayerPlan(layer=b.layer, ffn_size=b.size, ffn_keep=[int(i) for i in ffn_keep[b.layer]],
                                 heads_removed=sorted(int(h) for h in heads_remove.get(b.layer, [])))
              for b in ffn}
    for block in ffn:
        if len(ffn_keep[block.layer]) < block.size:
            bias = slice_ffn(g, block, ffn_keep[block.layer],
                             compensation.ffn_mean[block.layer] if compensation else None)
            layers[block.layer].ffn_bias = None if bias is None else bias.tolist()
    for block in attention:
        if heads_remove.get(block.layer):
            bias = remove_heads(g, block, heads_remove[block.layer],
                                compensation.context_mean[block.layer] if compensation else None)
            layers[block.layer].attention_bias = None if bias is None else bias.tolist()
    ffn_weights = [w for b in ffn for w in ((b.layer, "ffn.w1", b.w1), (b.layer, "ffn.w2", b.w2))]
    attention_weights = [w for b in attention for w in ((b.layer, "attention.q", b.q[0]), (b.layer, "attention.k", b.k[0]),
                                                        (b.layer, "attention.v", b.v[0]), (b.layer, "attention.out", b.out))]
    targets = {"none": [], "ffn": ffn_weights, "attention": attention_weights, "all": ffn_weights + attention_weights}
    done = sparsify_24(g, targets[sparsity])
    sparse = [name for _, _, name in done]
    plan = PruningPlan(layers=[layers[k] for k in sorted(layers)], sparse_24=[(layer, role) for layer, role, _ in done])
    drop_dead(pruned)
    # Marks the graph as pruned so `shipyard validate` applies the pruned thresholds to it.
    onnx.helper.set_model_props(pruned, {**{p.key: p.value for p in pruned.metadata_props},
                                         PRUNED_MARK: pruned_mark({str(k): v for k, v in heads_remove.items()}, len(sparse))})
    onnx.checker.check_model(pruned)
    return pruned, sparse, plan


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
        seen_rows: list[str] = ()) -> StageResult:
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
