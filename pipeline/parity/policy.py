"""The release policy that `run` and the standalone commands share, decided in one place.

- An artifact's *kind* (fp32, pruned, fp16, int8) picks the gate that judges it. The stage that
  makes an artifact decides its kind once and records it in the ONNX file's metadata
  (`shipyard.kind`) and in the manifest; everything downstream reads the record. Only an ONNX
  file Shipyard did not write is classified from its graph.
- An artifact converted from a pruned model (its INT8 forms, its TensorRT-ready graphs and
  engines) answers to two gates (`gates_for`): the pruned gate against the original PyTorch
  model, which bounds what the compressed release loses in all, and its precision's gate against
  the pruned FP32 graph it was made from, which bounds what the conversion lost.
- Which thresholds apply: the recipe's (or the defaults) for that kind, without the metric drop
  when there are no gold labels.
- The rows an artifact was fitted or chosen on (`shipyard.seen_rows`, content digests) travel
  inside it, so a standalone `validate` leaves them out of its evaluation sample.
- Seeds and batch sizes of the standalone commands.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.artifacts import kind_of as kind_of
from pipeline.errors import RecipeError
from pipeline.names import Kind, Padding
from pipeline.recipe import Gate, Thresholds
from pipeline.recipe.defaults import schema_default
from pipeline.tasks import METRICS

if TYPE_CHECKING:
    import onnx_ir as ir

KIND_KEY = "shipyard.kind"
SEEN_KEY = "shipyard.seen_rows"
PRUNED_MARK = "shipyard.pruned"
QUANTIZED_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "QAttention"}
# The standalone commands draw and batch rows as a recipe does by default.
STANDALONE_SEED: int = schema_default("data.seed")
STANDALONE_BATCH: int = schema_default("data.batch_size")


def calibration_padding(method: str, padding: Padding) -> Padding:
    """How calibration batches are padded. ORT's entropy and percentile calibrators stack every
    batch's activations into one array, so their batches must all be max_length; MinMax reduces
    each batch to a min and a max, so it takes the recipe's padding (rows ordered by length with
    `longest`), which spares the calibration, the sensitivity ranking and the pruning scores
    most of their work on padding."""
    return padding if method == "minmax" else "max_length"


def gated_metric(chosen: str | None, task: str, labelled: bool, where: str = "thresholds.metric") -> str | None:
    """The label metric whose drop is gated: `chosen`, which must fit the task, or the task's
    default; None without gold labels or for embeddings. `where` names the setting in the error."""
    allowed = METRICS[task]
    if chosen is not None and chosen not in allowed:
        raise RecipeError(f"{where} {chosen!r} does not apply to {task}; use one of: "
                          f"{', '.join(allowed) or 'none (remove it)'}")
    if not labelled or not allowed:
        return None
    return chosen or allowed[0]


def gate_for(thresholds: Thresholds, kind: str, labelled: bool) -> Gate:
    """The gate for one kind of artifact; without gold labels no metric drop is checked."""
    gate = getattr(thresholds, kind)
    return gate if labelled else gate.model_copy(update={"max_metric_drop": None})


@dataclass(frozen=True)
class Gates:
    """What judges one artifact: `reference` against the original PyTorch model and, when set,
    `source` against the FP32 graph the artifact was converted from."""

    reference: Gate
    source: Gate | None = None


def gates_for(thresholds: Thresholds, kind: str, precision: str, from_pruned: bool, labelled: bool) -> Gates:
    """The gates of an artifact of `kind` and `precision`; `from_pruned` when it was converted from
    a pruned (or recovered) graph rather than being that graph. Such an artifact cannot agree with
    the original more than its source does, so its own precision's gate (0.98 for INT8 by
    default) is checked against the source, and the pruned gate against the original."""
    if not from_pruned:
        return Gates(gate_for(thresholds, kind, labelled))
    return Gates(gate_for(thresholds, "pruned", labelled), gate_for(thresholds, precision, labelled))


def stamp(model: ir.Model, kind: str, seen: Iterable[str] = ()) -> None:
    """Record the artifact's kind and the rows it saw (merged with those its source saw)."""
    rows = set(seen_rows(model)) | set(seen)
    model.metadata_props[KIND_KEY] = kind
    if rows:
        model.metadata_props[SEEN_KEY] = ",".join(sorted(rows))


def seen_rows(model: ir.Model) -> list[str]:
    return [d for d in model.metadata_props.get(SEEN_KEY, "").split(",") if d]


def recorded_kind(model: ir.Model) -> str | None:
    return model.metadata_props.get(KIND_KEY)


def graph_kind(model: ir.Model) -> Kind:
    """The kind of an ONNX file Shipyard did not stamp: int8 when it quantizes anything, fp16
    when its weights are float16, pruned when the prune stage marked it, else fp32."""
    import onnx_ir as ir

    if any(n.op_type in QUANTIZED_OPS for n in model.graph):
        return "int8"
    if any(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values()):
        return "fp16"
    return "pruned" if PRUNED_MARK in model.metadata_props else "fp32"


def pruned_mark(heads_removed: dict, sparse: int) -> str:
    return json.dumps({"heads_removed": heads_removed, "sparse_24_weights": sparse})
