"""Tasks: what a model's head outputs, and what "the same prediction" means for each.

Tasks are named as Optimum names them. A task is read from the model folder's `config.json`
(`architectures`) unless the recipe or `--task` names one, and a named task must match the head.

| task | outputs | agreement (the headline figure) |
|---|---|---|
| text-classification | logits [B, C] | rows whose argmax class equals PyTorch's |
| token-classification | logits [B, S, C] | scored tokens (first sub-token of each word) whose argmax tag equals PyTorch's |
| question-answering | start/end logits [B, S] | rows whose best answer span equals PyTorch's |
| feature-extraction | last_hidden_state, pooled | rows whose embedding has cosine >= min_cosine with PyTorch's |

Runners return raw outputs; `reduce` keeps what the task compares (and pools embeddings right
away, so 2,000 rows of hidden states are never held at once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibration.encode import CONTEXT_OFFSETS, WORD_INDEX, split_words
from pipeline.errors import ModelError
from pipeline.names import TASKS
from pipeline.tasks import TASK_SPECS, TaskSpec, task_spec

if TYPE_CHECKING:
    import onnx_ir as ir

Batch = dict[str, np.ndarray]
# Views of the task table (`pipeline.tasks`), by task name.
AUTO_CLASSES = {name: spec.auto_class for name, spec in TASK_SPECS.items()}
OUTPUTS = {name: spec.outputs for name, spec in TASK_SPECS.items()}
UNITS = {name: spec.unit for name, spec in TASK_SPECS.items()}


def head_task(architectures: list[str]) -> str | None:
    """The task of a HF architecture name (BertForTokenClassification -> token-classification)."""
    for arch in architectures:
        for spec in TASK_SPECS.values():
            # A base model's suffix is "Model" alone: BertForMaskedLM ends in "LM", but "...ForModel" is no base.
            if arch.endswith(spec.head) and ("For" in spec.head or "For" not in arch):
                return spec.name
    return None


def resolve_task(config: dict[str, Any], folder: Path, asked: str | None) -> str:
    """The task to ship: the one asked for, which must match the head, or the head's own. A
    sentence-transformers folder (`modules.json`) is a sentence encoder whatever head its
    config.json names (`*ForMaskedLM` when it was fine-tuned from a masked-LM checkpoint), unless
    that head is a task head of its own."""
    architectures = list(config.get("architectures") or [])
    found = head_task(architectures)
    if found is None and (Path(folder) / "modules.json").is_file():
        found = "feature-extraction"
    if architectures and found is None:
        raise ModelError(
            f"model {folder}: head {architectures[0]} is not a task Shipyard supports; it ships "
            f"{', '.join(TASKS)} (the ...ForSequenceClassification, ...ForTokenClassification, "
            "...ForQuestionAnswering and base ...Model heads)"
        )
    if asked is None:
        if found is None:
            raise ModelError(f"model {folder}: config.json names no architectures; pass --task or set model.task "
                             f"({', '.join(TASKS)})")
        return found
    if asked not in TASKS:
        raise ModelError(f"task {asked!r} is not supported; use one of: {', '.join(TASKS)}")
    if found is not None and asked != found and asked != "feature-extraction":
        raise ModelError(f"model {folder}: task {asked} does not match its head {architectures[0]} ({found}); "
                         f"use task {found}")
    return asked


def graph_task(model: ir.Model) -> str | None:
    """The task an exported graph serves, from Optimum's output names (and the logits' rank)."""
    outputs = {o.name: len(o.shape or ()) for o in model.graph.outputs}
    if {"start_logits", "end_logits"} <= set(outputs):
        return "question-answering"
    if "logits" in outputs:
        return "token-classification" if outputs["logits"] == 3 else "text-classification"
    if "last_hidden_state" in outputs:
        return "feature-extraction"
    return None


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence embedding (sentence-transformers' Pooling module)."""

    mode: str = "mean"  # mean | cls | max
    normalize: bool = False

    @classmethod
    def of(cls, folder: Path) -> Pooling:
        """Read `modules.json` and the Pooling module's config; mean, unnormalised without them."""
        modules_file = Path(folder) / "modules.json"
        if not modules_file.is_file():
            return cls()
        try:
            modules = json.loads(modules_file.read_text())
            pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
            normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
            mode = "mean"
            if pooling is not None:
                config = json.loads((Path(folder) / pooling["path"] / "config.json").read_text())
                if config.get("pooling_mode_cls_token"):
                    mode = "cls"
                elif config.get("pooling_mode_max_tokens"):
                    mode = "max"
        except (ValueError, KeyError, OSError, TypeError):
            raise ModelError(f"model {folder}: modules.json or its Pooling config is unreadable; fix or remove it") from None
        return cls(mode, normalize)

    def __call__(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hidden = hidden.astype(np.float32)
        m = mask[..., None].astype(np.float32)
        if self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "max":
            pooled = np.where(m > 0, hidden, -np.inf).max(axis=1)
        else:
            pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        if self.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


@dataclass(frozen=True)
class Task:
    """A task with the options that decide its predictions."""

    name: str
    pooling: Pooling = Pooling()
    max_answer_tokens: int = 30
    min_cosine: float = 0.99

    @property
    def spec(self) -> TaskSpec:
        """The task's entry in the task table."""
        return task_spec(self.name)

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.spec.outputs

    @property
    def per_token(self) -> bool:
        """Whether the compared outputs have one value per token ([B, S, ...])."""
        return self.spec.per_token

    def reduce(self, outputs: Batch, batch: Batch) -> Batch:
        """What this task compares, from one batch's raw outputs."""
        if self.spec.kind == "embedding":
            return {"embedding": self.pooling(outputs["last_hidden_state"], batch["attention_mask"])}
        return {name: np.asarray(outputs[name], dtype=np.float32) for name in self.outputs}

    def predictions(self, reduced: list[Batch], batches: list[Batch]) -> np.ndarray:
        """One prediction per unit: class ids, tag ids of scored tokens, (start, end) spans, or
        embeddings."""
        kind = self.spec.kind
        if kind == "class":
            return np.concatenate([r["logits"] for r in reduced]).argmax(-1)
        if kind == "tag":
            return np.concatenate([r["logits"][b[WORD_INDEX] >= 0].argmax(-1) for r, b in zip(reduced, batches, strict=True)])
        if kind == "span":
            return np.concatenate([best_spans(r["start_logits"], r["end_logits"], b[CONTEXT_OFFSETS][..., 0] >= 0,
                                              self.max_answer_tokens) for r, b in zip(reduced, batches, strict=True)])
        return np.concatenate([r["embedding"] for r in reduced])

    def agreement(self, reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        """Per unit, whether the candidate's prediction counts as the reference's."""
        if self.spec.kind == "span":
            return (reference == candidate).all(axis=-1)
        if self.spec.kind == "embedding":
            return cosine(reference, candidate) >= self.min_cosine
        return reference == candidate

    def agreement_rate(self, reference: list[Batch], candidate: list[Batch], batches: list[Batch]) -> float:
        agree = self.agreement(self.predictions(reference, batches), self.predictions(candidate, batches))
        return float(agree.mean()) if agree.size else 1.0

    def distance(self, reference: list[Batch], candidate: list[Batch], batches: list[Batch]) -> float:
        """How far the candidate's outputs are from the reference's, continuously (0 = the same):
        1 - mean cosine of the embeddings for feature extraction, the mean |difference| of the
        compared outputs otherwise. Recovery keeps its closest check by it (agreement jumps between
        checks, and is flat while no row passes)."""
        if self.spec.kind == "embedding":
            similarity = cosine(self.predictions(reference, batches), self.predictions(candidate, batches))
            return float(1 - similarity.mean()) if similarity.size else 0.0
        return max_abs_diff(reference, candidate, batches, self.per_token)[1]


def row_tags(reduced: list[Batch], batches: list[Batch], id2label: dict[int, str]) -> list[list[str]]:
    """Per row, the predicted tag of each scored word (its first sub-token), in word order."""
    tags = []
    for out, batch in zip(reduced, batches, strict=True):
        words = batch[WORD_INDEX]
        predicted = out["logits"].argmax(-1)
        for r in range(len(words)):
            order = np.flatnonzero(words[r] >= 0)
            tags.append([id2label.get(int(t), str(t)) for t in predicted[r, order]])
    return tags


def answers(spans: np.ndarray, batches: list[Batch], contexts: list[str]) -> list[str]:
    """The context text each (start, end) token span covers ("" for no span)."""
    found, i = [], 0
    for batch in batches:
        offsets = batch[CONTEXT_OFFSETS]
        for r in range(len(offsets)):
            start, end = spans[i]
            found.append("" if start < 0 else contexts[i][offsets[r, start, 0]: offsets[r, end, 1]])
            i += 1
    return found


def readable(task: Task, reduced: list[Batch], batches: list[Batch], id2label: dict[int, str],
             texts: list[str], contexts: list[str] | None = None) -> list[dict[str, Any]]:
    """Per row, the prediction as a client reads it, made by the code the gate compares with: a
    class's label and softmax score; each word with its tag; the answer span's text and its token
    positions; the pooled embedding (normalised where the model's pooling says so)."""
    predicted = task.predictions(reduced, batches)
    kind = task.spec.kind
    if kind == "class":
        logits = np.concatenate([r["logits"] for r in reduced]).astype(np.float64)
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        return [{"label": id2label.get(int(c), str(int(c))), "score": float(scores[i, c])}
                for i, c in enumerate(predicted)]
    if kind == "tag":
        return [{"words": split_words(text)[: len(tags)], "tags": tags}
                for text, tags in zip(texts, row_tags(reduced, batches, id2label), strict=True)]
    if kind == "span":
        spans = answers(predicted, batches, contexts or [])
        return [{"answer": answer, "start_token": int(s), "end_token": int(e)}
                for answer, (s, e) in zip(spans, predicted, strict=True)]
    return [{"embedding": [float(x) for x in row]} for row in predicted]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return (a64 * b64).sum(-1) / np.maximum(norms, 1e-12)


def best_spans(start: np.ndarray, end: np.ndarray, context: np.ndarray, max_tokens: int) -> np.ndarray:
    """Per row, the (start, end) inside the context with start <= end < start + max_tokens that
    maximises start_logit + end_logit; (-1, -1) for a row without context tokens."""
    rows, length = start.shape
    best = np.full(rows, -np.inf)
    spans = np.full((rows, 2), -1, dtype=np.int64)
    s = np.where(context, start, -np.inf)
    e = np.where(context, end, -np.inf)
    for width in range(min(max_tokens, length)):
        score = s[:, : length - width] + e[:, width:]
        pos = score.argmax(axis=1)
        value = score[np.arange(rows), pos]
        better = value > best
        best[better] = value[better]
        spans[better, 0] = pos[better]
        spans[better, 1] = pos[better] + width
    return spans


def collect(runner, batches: list[Batch], task: Task, progress=None) -> list[Batch]:
    """Run every batch and keep what `task` compares; `progress(n)` is called per batch."""
    reduced = []
    for batch in batches:
        reduced.append(task.reduce(runner.infer(batch), batch))
        if progress is not None:
            progress(len(batch["input_ids"]))
    return reduced


DIFF_EDGES = [0.0] + [10.0 ** e for e in range(-8, 3)]  # |difference| bins: 0, 1e-8 ... 100
MARGIN_EDGES = [i / 20 for i in range(21)]


def distributions(task: Task, reference: list[Batch], candidate: list[Batch], batches: list[Batch]) -> dict[str, Any]:
    """Histograms of one comparison for the HTML report: the largest |difference| per unit (row,
    or scored token position for per-token outputs), and for classes PyTorch's margin (top
    probability minus the next) over all rows and over the rows that flipped."""
    worst = []
    for ref, cand, batch in zip(reference, candidate, batches, strict=True):
        mask = batch["attention_mask"].astype(bool)
        per_unit = None
        for name, value in ref.items():
            diff = np.abs(value.astype(np.float64) - cand[name].astype(np.float64))
            diff = diff[mask] if task.per_token else diff
            diff = diff.reshape(len(diff), -1).max(axis=1) if diff.ndim > 1 else diff
            per_unit = diff if per_unit is None else np.maximum(per_unit, diff)
        if per_unit is not None:
            worst.append(per_unit)
    values = np.concatenate(worst) if worst else np.zeros(0)
    found: dict[str, Any] = {"abs_diff": {"edges": DIFF_EDGES,
                                          "counts": np.histogram(np.clip(values, 0, 100), DIFF_EDGES)[0].tolist()}}
    if task.spec.kind == "class":
        logits = np.concatenate([r["logits"] for r in reference]).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.sort(probs, axis=-1)
        margin = top[:, -1] - top[:, -2] if top.shape[-1] > 1 else top[:, -1]
        flipped = task.predictions(reference, batches) != task.predictions(candidate, batches)
        found["margin"] = {"edges": MARGIN_EDGES, "all": np.histogram(margin, MARGIN_EDGES)[0].tolist(),
                           "flipped": np.histogram(margin[flipped], MARGIN_EDGES)[0].tolist()}
    return found


def max_abs_diff(reference: list[Batch], candidate: list[Batch], batches: list[Batch],
                 per_token: bool) -> tuple[float, float]:
    """Largest and mean |difference| over every compared output; `per_token` outputs ([B, S, ...])
    only at non-padding positions. Told, not guessed from shapes: an embedding [B, 384] and a
    mask [B, 384] (384 hidden units, padded to 384 tokens) look alike."""
    largest, total, count = 0.0, 0.0, 0
    for ref, cand, batch in zip(reference, candidate, batches, strict=True):
        mask = batch["attention_mask"].astype(bool)
        for name, value in ref.items():
            diff = np.abs(value.astype(np.float64) - cand[name].astype(np.float64))
            if per_token:
                diff = diff[mask]  # padding positions are not predictions
            if diff.size:
                largest = max(largest, float(diff.max()))
                total += float(diff.sum())
                count += diff.size
    return largest, (total / count if count else 0.0)
