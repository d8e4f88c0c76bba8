"""What Shipyard knows about each task: one entry per task, as Optimum names it.

Adding a task is adding its entry here (and its name to `pipeline.names.TaskName`) and teaching
the consumers its `kind` where it is new. Everything else reads the entry:

- `head`, `auto_class`, `ort_class`: the Hugging Face architecture suffix that means this task,
  the transformers auto class that loads it, and Optimum's ONNX Runtime class (the benchmarks').
- `outputs`: what the graph and PyTorch return that the gates compare.
- `kind`: what one prediction is: a class per row, a tag per scored token, an answer span per row,
  or an embedding per row. It decides how predictions are made and agree (`pipeline.parity.tasks`),
  which gold labels a row carries (`pipeline.inputs.data`) and the distillation loss
  (`pipeline.stages.prune.recover`).
- `unit`: what agreement counts (rows, or tokens for tagging); `agreement`: that in words (the report).
- `metrics`: the label metrics it reports, the first gated by default; embeddings have none.
- `encoding`: how calibration tokenizes a row (`calibration.encode`): plain text (with an
  optional pair), pre-split words whose first sub-tokens are scored, or a question and its context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.names import TASKS, MetricName, TaskName

if TYPE_CHECKING:  # the CLI reads this table; numpy and the tokenizers stay unloaded
    from calibration.encode import Encoding

Kind = Literal["class", "tag", "span", "embedding"]


@dataclass(frozen=True)
class TaskSpec:
    """One task (module docstring)."""

    name: TaskName
    head: str
    auto_class: str
    ort_class: str
    outputs: tuple[str, ...]
    kind: Kind
    unit: Literal["rows", "tokens"]
    agreement: str
    metrics: tuple[MetricName, ...]
    encoding: Encoding

    @property
    def per_token(self) -> bool:
        """Whether the compared outputs have one value per token ([B, S, ...])."""
        return self.kind in ("tag", "span")


TASK_SPECS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("text-classification", "ForSequenceClassification", "AutoModelForSequenceClassification",
             "ORTModelForSequenceClassification", ("logits",), "class", "rows",
             "the predicted class equals PyTorch's", ("accuracy", "macro_f1"), "text"),
    TaskSpec("token-classification", "ForTokenClassification", "AutoModelForTokenClassification",
             "ORTModelForTokenClassification", ("logits",), "tag", "tokens",
             "the tag of each word's first sub-token equals PyTorch's (special and padding tokens excluded)",
             ("entity_f1", "token_accuracy"), "words"),
    TaskSpec("question-answering", "ForQuestionAnswering", "AutoModelForQuestionAnswering",
             "ORTModelForQuestionAnswering", ("start_logits", "end_logits"), "span", "rows",
             "the best answer span equals PyTorch's", ("f1", "exact_match"), "question-context"),
    # A base model (`...Model`) is a sentence encoder: no head suffix beyond the family's name.
    TaskSpec("feature-extraction", "Model", "AutoModel", "ORTModelForFeatureExtraction", ("last_hidden_state",),
             "embedding", "rows", "the embedding's cosine with PyTorch's reaches thresholds.min_cosine", (), "text"),
)}
assert tuple(TASK_SPECS) == TASKS, "every name in pipeline.names.TaskName has one entry, in order"

# The label metrics each task reports (the first is the default gated one).
METRICS: dict[str, tuple[str, ...]] = {name: spec.metrics for name, spec in TASK_SPECS.items()}


def task_spec(name: str) -> TaskSpec:
    """The entry of task `name` (a name from `pipeline.names.TASKS`, checked where it was read)."""
    return TASK_SPECS[name]
