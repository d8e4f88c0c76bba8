"""What pruning removes first: FFN neurons and attention heads scored on calibration data.

- FFN neuron score: mean |GELU output| over non-padding tokens times the L2 norm of the
  neuron's W2 row (its contribution to the residual stream).
- Head score: mean over non-padding tokens of ||context_h @ W_o[h]||, the head's contribution
  to the attention output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pipeline.errors import ShipyardError
from pipeline.graph import model as graph_model
from pipeline.graph.attention import AttentionBlock
from pipeline.graph.bert import FfnBlock, Graph

Batch = dict[str, np.ndarray]


class PruneError(ShipyardError):
    """A pruning request that cannot be applied to this graph."""


@dataclass
class Scores:
    """Per-layer importance of FFN neurons and heads, and their mean outputs for compensation."""

    ffn: dict[int, np.ndarray]
    heads: dict[int, np.ndarray]
    ffn_mean: dict[int, np.ndarray]  # E[GELU output] per neuron
    context_mean: dict[int, np.ndarray]  # E[context] per head, [heads, head_dim]


def score(model: ir.Model, batches: list[Batch], ffn: list[FfnBlock],
          attention: list[AttentionBlock], compensate: bool) -> Scores:
    """Score neurons and heads on the calibration batches (non-padding tokens only).

    Without compensation a unit's score is its mean contribution magnitude. With it, the unit's
    mean contribution is folded into the next bias when it is removed, so what is lost is only
    its deviation from that mean, and units are scored by that (std instead of mean |.|).
    """
    g = Graph(model)
    tensors = [b.activation for b in ffn] + [b.context for b in attention]
    session = graph_model.session(model, tensors)
    feeds = {i.name for i in session.get_inputs()}
    acc: dict[str, dict[int, np.ndarray]] = {key: {} for key in ("abs", "sum", "sq", "ctx", "norm", "norm_sq")}
    out_heads = {b.layer: g.array(b.out).reshape(b.num_heads, b.head_dim, -1) for b in attention}
    tokens = 0
    for batch in batches:
        mask = batch["attention_mask"].astype(bool)
        tokens += int(mask.sum())
        values = session.run(tensors, {k: v for k, v in batch.items() if k in feeds})
        for block, act in zip(ffn, values[: len(ffn)], strict=True):
            a = act[mask].astype(np.float64)  # [tokens, I]
            for key, value in (("abs", np.abs(a).sum(0)), ("sum", a.sum(0)), ("sq", (a * a).sum(0))):
                acc[key][block.layer] = acc[key].get(block.layer, 0) + value
        for block, ctx in zip(attention, values[len(ffn):], strict=True):
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


def plan_ffn(scores: dict[int, np.ndarray], fraction: float, scope: str, multiple: int = 1) -> dict[int, np.ndarray]:
    """Indices of the neurons to keep per layer (sorted), dropping `fraction` of them; with
    `multiple`, each layer keeps the multiple of it nearest to what the fraction leaves (at least
    one multiple, at most every neuron), the highest-scored first."""
    if fraction <= 0:
        return {layer: np.arange(len(s)) for layer, s in scores.items()}
    if scope == "uniform":
        counts = {layer: max(1, int(round(len(s) * (1 - fraction)))) for layer, s in scores.items()}
    else:  # global: one threshold over scores normalised per layer, and at least 5% kept per layer
        normalised = {layer: s / (s.mean() or 1.0) for layer, s in scores.items()}
        threshold = np.quantile(np.concatenate(list(normalised.values())), fraction)
        counts = {layer: max(int(np.ceil(0.05 * len(s))), 1, int((s > threshold).sum()))
                  for layer, s in normalised.items()}
    keep = {}
    for layer, s in scores.items():
        count = counts[layer]
        if multiple > 1:
            count = min(len(s), max(multiple, int(round(count / multiple)) * multiple))
        keep[layer] = np.sort(np.argsort(-s)[:count])
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
