"""Which quantized nodes hurt most, and how many to keep in float: sensitivity-guided fallback.

Measured on the demo MiniLM: quantizing every MatMul with symmetric INT8 activations cost 10
points of agreement, almost all from the FFN output MatMuls, whose GELU inputs carry outliers
that a symmetric scale resolves poorly. Keeping the worst few nodes in float recovers it. ONNX
Runtime's quantizer takes an exclusion list but does not choose one, so this module does:

1. rank nodes by the relative error that symmetric INT8 (max-abs scale) puts on their float
   activation inputs, measured on the calibration batches, streaming (two passes, no tensors kept);
2. quantize with the worst k excluded, for k on a growing schedule searched by bisection, until
   prediction agreement with the FP32 graph on the tuning rows reaches the target. The tuning
   rows come from the calibration source but set no scale, and evaluation rows are never used
   here, so the parity gate afterwards stays an honest held-out check.

A quantizer may have settings that change its scales but not its speed (NNCF's SmoothQuant
alpha): `settle` tries them first with no node in float, so a node is kept in float (which costs
speed) only when no setting reaches the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pipeline.graph import model as graph_model

Batch = dict[str, np.ndarray]
RANKED_OPS = ("MatMul", "Gemm", "Attention")


def _activation_inputs(model: ir.Model) -> dict[str, list[str]]:
    """node name -> its activation (non-initializer) inputs, for the ops we quantize."""
    out = {}
    for node in model.graph:
        if node.op_type not in RANKED_OPS or not node.name:
            continue
        if node.op_type == "Attention" and not graph_model.is_packed_attention(node):
            continue  # the standard ONNX Attention: activations only, nothing the quantizers touch
        inputs = node.inputs[:1] if node.op_type == "Attention" else node.inputs
        acts = [i.name for i in inputs if i is not None and i.name and not i.is_initializer()]
        if acts:
            out[node.name] = acts
    return out


RANK_BATCHES = 8


def rank_nodes(onnx_path: Path, batches: list[Batch]) -> list[tuple[str, float]]:
    """Nodes by INT8 activation error, worst first: (name, max relative error over its inputs).

    The ranking needs the order of the nodes, not exact errors, so it reads at most
    RANK_BATCHES batches spread evenly over the calibration rows (which may be ordered by
    length): on the demo that halved the stage's largest cost and kept the same worst nodes."""
    step = -(-len(batches) // RANK_BATCHES)
    batches = batches[::step]

    model = graph_model.load(onnx_path)
    inputs_of = _activation_inputs(model)
    tensors = sorted({t for acts in inputs_of.values() for t in acts})
    session = graph_model.session(model, tensors)
    feed_names = {i.name for i in session.get_inputs()}

    def activations():
        for batch in batches:
            values = session.run(tensors, {k: v for k, v in batch.items() if k in feed_names})
            yield {t: v for t, v in zip(tensors, values, strict=True) if np.issubdtype(v.dtype, np.floating)}

    amax: dict[str, float] = {}
    for acts in activations():
        for t, v in acts.items():
            amax[t] = max(amax.get(t, 0.0), float(np.abs(v).max()))
    noise = dict.fromkeys(amax, 0.0)
    signal = dict.fromkeys(amax, 0.0)
    for acts in activations():
        for t, v in acts.items():
            scale = amax[t] / 127 or 1.0
            q = np.clip(np.round(v / scale), -127, 127) * scale
            noise[t] += float(np.square(q - v, dtype=np.float64).sum())
            signal[t] += float(np.square(v, dtype=np.float64).sum())
    error = {t: (noise[t] / signal[t]) ** 0.5 if signal[t] else 0.0 for t in amax}
    scores = [(name, max(error.get(t, 0.0) for t in acts)) for name, acts in inputs_of.items()]
    return sorted(scores, key=lambda item: item[1], reverse=True)


def schedule(max_nodes: int) -> list[int]:
    """How many nodes to keep in float at each try: 0, 1, 2, 4, 6, 8, 12, 16, 24, ..."""
    steps, k = [0], 1
    while k <= max_nodes:
        steps.append(k)
        k = k + 1 if k < 2 else k + 2 if k < 8 else k + 4 if k < 16 else k + 8
    if steps[-1] != max_nodes and max_nodes > 0:
        steps.append(max_nodes)
    return steps


@dataclass
class Trial:
    excluded: int
    agreement: float
    max_abs_diff: float
    setting: str | None = None  # the quantizer's setting, where it has several (`settle`)

    def record(self) -> dict[str, object]:
        """The trial as the manifest records it (no setting key for a quantizer with one)."""
        return {k: v for k, v in vars(self).items() if k != "setting" or v is not None}


Quantize = Callable[[list[str]], Path]
Evaluate = Callable[[Path], tuple[float, float]]


def settle(settings: dict[str, Quantize], evaluate: Evaluate, min_agreement: float) -> tuple[str, Path, list[Trial]]:
    """The setting to quantize with: each is tried in order with no node in float, and the first
    that reaches the target wins; if none does, the one agreeing best (the earlier among equals),
    with which `search` then keeps nodes in float. Returns (its name, its artifact with no node in
    float, every trial)."""
    tried: list[tuple[str, Path, Trial]] = []
    for name, quantize in settings.items():
        path = quantize([])
        agreement, largest = evaluate(path)
        tried.append((name, path, Trial(excluded=0, agreement=agreement, max_abs_diff=largest, setting=name)))
        if agreement >= min_agreement:
            break
    name, path, _ = max(tried, key=lambda item: (item[2].agreement, -tried.index(item)))
    return name, path, [trial for _, _, trial in tried]


def search(
    quantize: Quantize,
    evaluate: Evaluate,
    ranking: list[tuple[str, float]],
    min_agreement: float,
    max_nodes: int,
    measured: tuple[Path, Trial] | None = None,
) -> tuple[Path, list[str], list[Trial], Trial]:
    """The fewest of the worst nodes to keep in float for agreement to reach the target.

    `evaluate(path)` gives (agreement with the FP32 graph, max |output diff|) on the tuning rows.
    Each try costs a quantization and a pass over the tuning rows, so the schedule is bisected:
    none kept, then all `max_nodes`, then halves between the last failing and first passing try
    (about log2 of the schedule's length). If even `max_nodes` misses the target, the best try
    (fewest nodes among equals) is returned and the parity gate decides. Agreement on a few
    hundred rows is only roughly monotone in k, so the pick is always among measured tries.
    `measured`: the try with no node in float, already made (`settle`). Returns the chosen model,
    its excluded nodes, every trial and the chosen one.
    """
    names = [name for name, _ in ranking]
    steps = schedule(min(max_nodes, len(names)))
    trials: dict[int, Trial] = {}
    paths: dict[int, Path] = {}

    def passes(index: int) -> bool:
        k = steps[index]
        if k == 0 and measured is not None:
            paths[0], trials[0] = measured
            return measured[1].agreement >= min_agreement
        paths[k] = quantize(names[:k])
        agreement, largest = evaluate(paths[k])
        trials[k] = Trial(excluded=k, agreement=agreement, max_abs_diff=largest,
                          setting=measured[1].setting if measured else None)
        return agreement >= min_agreement

    if not passes(0) and len(steps) > 1 and passes(len(steps) - 1):
        failing, passing = 0, len(steps) - 1
        while passing - failing > 1:
            middle = (failing + passing) // 2
            if passes(middle):
                passing = middle
            else:
                failing = middle
    met = [t for t in trials.values() if t.agreement >= min_agreement]
    best = min(met, key=lambda t: t.excluded) if met else max(
        trials.values(), key=lambda t: (t.agreement, -t.excluded))
    ordered = [trials[k] for k in sorted(trials)]
    return paths[best.excluded], names[: best.excluded], ordered, best
