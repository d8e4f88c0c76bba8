"""What every stage of a run shares, made once: the model's facts, the task, the data splits, the
recovery data and the gating of artifacts (`pipeline.run.gating`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from calibration.encode import load_tokenizer
from calibration.sampling import row_digest
from calibration.sources import load_rows, require_columns
from pipeline.artifacts import sha256_file
from pipeline.errors import RecipeError
from pipeline.inputs import data as datamod
from pipeline.inputs.model import check_max_length, inspect_model
from pipeline.parity.policy import calibration_padding, gated_metric
from pipeline.parity.runners import TorchRunner, torch_device
from pipeline.recipe import Recipe
from pipeline.release.manifest import folder_sha256
from pipeline.run.cache import digest_of
from pipeline.run.gating import Gating
from pipeline.stages.prune.recover import TrainingData


@dataclass
class RecoveryInputs:
    """What recovery in a recipe trains on and how, and the identity its cache key uses."""

    spec: Any
    data: TrainingData
    key: dict[str, Any]

    def cache_identity(self) -> dict[str, Any]:
        """What a stage's cache key records of recovery (`pipeline.run.cache.call_identity`)."""
        return self.key

    @classmethod
    def of(cls, inputs: RunInputs) -> RecoveryInputs:
        recipe, prepared = inputs.recipe, inputs.prepared
        source = recipe.data.training
        if source is None:  # the recipe schema refuses recovery without data.training
            raise RecipeError("stages.prune.recover needs data.training: the text to distil on")
        rows = load_rows(source.path, source.encoding)  # a missing file or column fails here, before any stage
        columns = datamod.source_columns(recipe.data, source, list(rows[0].keys()))
        require_columns(rows, columns.needed(), source.path)
        evaluation = prepared.evaluation
        exclude = frozenset(row_digest(evaluation.columns, r) for r in evaluation.rows) | frozenset(
            prepared.tuning.digests)
        data = TrainingData(source.path, columns, source.samples, source.encoding, exclude)
        key = {"model": inputs.model_sha, "spec": recipe.stages.prune.recover.model_dump(mode="json"),
               "training": {"content": sha256_file(source.path) if source.path.is_file() else folder_sha256(source.path), "columns": [columns.text, columns.text_pair,
                                                                               columns.label],
                            "samples": source.samples, "encoding": source.encoding},
               "exclude": digest_of(sorted(exclude)), "max_length": recipe.data.max_length,
               "opset": recipe.stages.export.opset, "task": repr(inputs.task)}
        return cls(recipe.stages.prune.recover, data, key)


@dataclass
class RunInputs:
    """What every gate of a recipe needs, made once: the model's facts, the task, the data splits."""

    recipe: Recipe
    info: Any
    model_sha: str
    task: Any
    metric: str | None
    labelled: bool
    prepared: Any
    gating: Gating
    recovery: RecoveryInputs | None = None  # when the recipe recovers after pruning

    @classmethod
    def of(cls, recipe: Recipe, for_engines: bool = False) -> RunInputs:
        """`for_engines`: what phase two needs to gate an engine (the evaluation rows, tokenized; which
        rows calibration and tuning took, not their tokens; no recovery data)."""
        info = inspect_model(recipe.model.path, recipe.model.task, recipe.model.allow_pickle)
        check_max_length(info, recipe.data.max_length, "data.max_length")
        for target in recipe.targets:
            for index, profile in enumerate(target.profiles):
                check_max_length(info, profile.sequence.max, f"targets.{target.name}.profiles[{index}].sequence.max")
        task = info.task(recipe.model.max_answer_tokens, recipe.thresholds.min_cosine)
        tokenizer = load_tokenizer(recipe.model.path, task.spec.encoding)
        prepared = datamod.prepare(recipe.data, tokenizer, info.label2id, task.name,
                                   calibration_padding(recipe.stages.quantize.method, recipe.data.padding),
                                   encode_fitting=not for_engines)
        labelled = recipe.data.evaluation_label is not None
        metric = gated_metric(recipe.thresholds.metric, task.name, labelled)
        model_sha = folder_sha256(info.path)
        torch = TorchRunner(recipe.model.path, task=task.name, allow_pickle=recipe.model.allow_pickle,
                            device=torch_device(recipe.model.device))
        gating = Gating(recipe.thresholds, prepared.evaluation, task, metric, labelled, info.id2label, torch, model_sha)
        inputs = cls(recipe, info, model_sha, task, metric, labelled, prepared, gating)
        prune = recipe.stages.prune
        if prune.enabled and prune.recover.enabled and not for_engines:
            inputs.recovery = RecoveryInputs.of(inputs)
        return inputs
