"""Label metrics per task, written here so the gate has no heavy dependencies.

- Classification: accuracy and macro-F1.
- Token classification: entity-level precision/recall/F1 in seqeval's strict IOB2 mode (an
  entity is a B-X followed by I-X tags of the same type; an I-X that starts a chunk is not an
  entity), micro-averaged over all rows, plus word-level tag accuracy.
- Question answering: SQuAD v1.1 exact match and token F1 against the best of the gold
  answers, after SQuAD's normalisation (lowercase, no punctuation, no articles, single spaces).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean())


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    scores = []
    for c in range(num_classes):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """Strict IOB2 chunks of one sequence: (type, first word, last word)."""
    found, current = set(), None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, kind = tag.partition("-")
        if current is not None and not (prefix == "I" and kind == current[0]):
            found.add((current[0], current[1], i - 1))
            current = None
        if prefix == "B":
            current = (kind, i)
    return found


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities, and word-level tag accuracy."""
    tp = n_pred = n_gold = 0
    words = right = 0
    for g, p in zip(gold, predicted, strict=True):
        gold_set, pred_set = entities(g), entities(p)
        tp += len(gold_set & pred_set)
        n_pred += len(pred_set)
        n_gold += len(gold_set)
        words += len(g)
        right += sum(a == b for a, b in zip(g, p, strict=False))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall,
            "token_accuracy": right / words if words else 0.0}


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Mean exact match and F1, each against the best-matching gold answer of a row."""
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in zip(predictions, golds, strict=True)]
    f1 = [max(_token_f1(p, g) for g in gs) for p, gs in zip(predictions, golds, strict=True)]
    return {"exact_match": float(np.mean(em)) if em else 0.0, "f1": float(np.mean(f1)) if f1 else 0.0}
