"""Checks on the input model folder, done before any stage runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.encode import TOKENIZER_FILES
from pipeline.errors import ModelError
from pipeline.families import FAMILIES, family_of
from pipeline.parity.tasks import Pooling, Task, resolve_task
from pipeline.tasks import task_spec

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# Pickle checkpoints can run code when unpickled: refused unless the user allows them, and then
# loaded by transformers with torch.load(weights_only=True).
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_type: str
    num_labels: int
    label2id: dict[str, int]
    config: dict[str, Any]
    task_name: str

    @property
    def id2label(self) -> dict[int, str]:
        return {i: name for name, i in self.label2id.items()}

    def task(self, max_answer_tokens: int = 30, min_cosine: float = 0.99) -> Task:
        """The task with its options; pooling comes from the folder's sentence-transformers config."""
        pooling = Pooling.of(self.path) if task_spec(self.task_name).kind == "embedding" else Pooling()
        return Task(self.task_name, pooling, max_answer_tokens, min_cosine)


def _check_safetensors(folder: Path) -> None:
    """A truncated or overwritten weights file fails here, by name, not deep inside transformers.
    safetensors checks that the header's tensors exactly cover the file; the header is all it reads."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="np") as weights:
                weights.keys()
        except (SafetensorError, OSError) as err:
            raise ModelError(f"model weights {path} are truncated or corrupt ({str(err).strip()[:80]}); "
                             "re-save the model (shipyard demo prepare --force for the demo)") from None


def max_positions(info: ModelInfo) -> int:
    """The longest input the model's position embeddings allow (RoBERTa-style models reserve the
    first two positions for padding)."""
    return int(info.config.get("max_position_embeddings", 512)) - family_of(info.config).reserved_positions


def check_max_length(info: ModelInfo, max_length: int, where: str) -> None:
    limit = max_positions(info)
    if max_length > limit:
        raise ModelError(f"{where} {max_length} is longer than model {info.path}'s {limit} positions "
                         f"(max_position_embeddings); set it to {limit} or less")


def inspect_model(folder: Path, task: str | None, allow_pickle: bool = False) -> ModelInfo:
    """Validate a fine-tuned model folder and read what the pipeline needs from its config; the task
    is `task` (checked against the model's head) or, with None, the head's own. Weights must be safetensors
    unless `allow_pickle`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} not found; pass a local Hugging Face model folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"model folder {folder} has no config.json; save it with model.save_pretrained")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        raise ModelError(f"model config {config_path} is not valid JSON; re-save the model") from None
    model_type = config.get("model_type", "")
    if model_type not in FAMILIES:
        raise ModelError(
            f"model {folder} is {model_type or 'of unknown type'!r}, a family Shipyard does not know; "
            f"it supports {', '.join(FAMILIES)} (pipeline/families.py)"
        )
    if not any((folder / name).exists() for name in SAFE_WEIGHTS):
        if not any((folder / name).exists() for name in PICKLE_WEIGHTS):
            raise ModelError(f"model folder {folder} has no weights (model.safetensors); save them there")
        if not allow_pickle:
            raise ModelError(f"model folder {folder} has only pickle weights (pytorch_model.bin), which can run code "
                             "when loaded; re-save them as safetensors (model.save_pretrained) or pass --allow-pickle "
                             "(model.allow_pickle: true) to load them with torch.load(weights_only=True)")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(
            f"model folder {folder} has no tokenizer (no tokenizer.json or vocab.txt); "
            "save it there with tokenizer.save_pretrained(folder)"
        )
    _check_safetensors(folder)
    task_name = resolve_task(config, folder, task)
    if task_name not in FAMILIES[model_type].tasks:
        raise ModelError(f"model {folder}: Optimum exports no {task_name} for {model_type} (it exports "
                         f"{', '.join(FAMILIES[model_type].tasks)}); choose one of those tasks")
    id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
    label2id = {str(name): int(i) for i, name in id2label.items()}
    return ModelInfo(folder, model_type, len(id2label), label2id, config, task_name)
