"""What every stage of a run shares, made once: the model's facts, the task, the data splits, the
reference outputs (PyTorch's, or a pruned source graph's), and the gating of one artifact."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.encode import load_tokenizer
from calibration.sampling import row_digest
from calibration.sources import load_rows, require_columns
from pipeline.artifacts import (
    Artifact,
    StageResult,
    sha256_file,
)
from pipeline.errors import RecipeError
from pipeline.inputs import data as datamod
from pipeline.inputs.model import check_max_length, inspect_model
from pipeline.parity.policy import calibration_padding, gated_metric, gates_for
from pipeline.parity.runners import OrtRunner, TorchRunner
from pipeline.parity.tasks import collect
from pipeline.progress import Progress
from pipeline.recipe import Gate, Recipe
from pipeline.release.manifest import (
    folder_sha256,
)
from pipeline.run.cache import CachedStages, StageCache, batches_digest, digest_of
from pipeline.stages import validate
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
    digests: dict[str, str]
    recovery: RecoveryInputs | None = None  # when the recipe recovers after pruning

    @classmethod
    def of(cls, recipe: Recipe, for_engines: bool = False) -> RunInputs:
        """`for_engines`: what phase two needs to gate an engine (the evaluation rows, tokenized; which
        rows calibration and tuning took, not their tokens; no recovery data)."""
        info = inspect_model(recipe.model.path, recipe.model.task, recipe.model.allow_pickle)
        check_max_length(info, recipe.data.max_length, "data.max_length")
        task = info.task(recipe.model.max_answer_tokens, recipe.thresholds.min_cosine)
        tokenizer = load_tokenizer(recipe.model.path, task.name)
        prepared = datamod.prepare(recipe.data, tokenizer, info.label2id, task.name,
                                   calibration_padding(recipe.stages.quantize.method, recipe.data.padding),
                                   encode_fitting=not for_engines)
        digests = {"calibration": batches_digest(prepared.calibration.batches),
                   "tuning": batches_digest(prepared.tuning.batches),
                   "evaluation": batches_digest(prepared.evaluation.batches)}
        inputs = cls(recipe, info, folder_sha256(info.path), task, gated_metric(recipe.thresholds.metric, task.name, recipe.data.evaluation_label is not None),
                     recipe.data.evaluation_label is not None, prepared, digests)
        prune = recipe.stages.prune
        if prune.enabled and prune.recover.enabled and not for_engines:
            inputs.recovery = RecoveryInputs.of(inputs)
        return inputs

    def torch_runner(self) -> TorchRunner:
        return TorchRunner(self.recipe.model.path, task=self.task.name, allow_pickle=self.recipe.model.allow_pickle)

    def reference_outputs(self, cache: StageCache, progress: Progress) -> ReferenceOutputs:
        return ReferenceOutputs(cache, self.torch_runner(), self.prepared.evaluation.batches, self.task, progress,
                                {"model": self.model_sha, "batches": self.digests["evaluation"],
                                 "task": repr(self.task)})

    def source_outputs(self, source: Artifact, cache: StageCache, progress: Progress) -> ReferenceOutputs:
        """`source`'s ONNX Runtime outputs on the evaluation batches: what artifacts converted from a
        pruned graph are gated against besides PyTorch (`pipeline.parity.policy.gates_for`)."""
        return ReferenceOutputs(cache, OrtRunner(source.path), self.prepared.evaluation.batches, self.task, progress,
                                {"model": source.sha256, "batches": self.digests["evaluation"], "task": repr(self.task)},
                                name=source.name, stage="source-outputs")

    def validate(self, artifact: Artifact, stages: CachedStages, reference: ReferenceOutputs,
                 progress: Progress, source: ReferenceOutputs | None = None
                 ) -> tuple[list[StageResult], dict, dict | None]:
        """Gate `artifact` against PyTorch on the evaluation rows and, when it was converted from a
        pruned graph (`source`), against that graph too, each with the gate the policy gives it.
        Returns the stage results and the two parity reports (the second None without a source)."""
        gates = gates_for(self.recipe.thresholds, artifact.kind, artifact.precision, source is not None,
                          self.labelled)
        result, report = self._check(artifact, f"validate[{artifact.name}]", stages, reference, gates.reference,
                                     progress)
        if gates.source is None or source is None:
            return [result], report, None
        step, step_report = self._check(artifact, f"validate[{artifact.name} vs {source.name}]", stages, source,
                                        gates.source, progress)
        return [result, step], report, step_report

    def _check(self, artifact: Artifact, stage: str, stages: CachedStages, reference: ReferenceOutputs,
               gate: Gate, progress: Progress) -> tuple[StageResult, dict]:
        evaluation, id2label = self.prepared.evaluation, self.info.id2label
        reports: dict[str, dict] = {}

        def check() -> StageResult:
            with progress.task(f"validate {artifact.name} vs {reference.name}", total=len(evaluation.rows)) as advance:
                result, report = validate.run(artifact, reference.get(), evaluation, gate, self.metric,
                                              id2label, self.task, advance)
            result.stage = stage
            reports["report"] = {**report.to_dict(), "reference": reference.name}
            return result

        result, extra = stages.run(stage, {
            "artifact": artifact.sha256, "reference": reference.inputs, "rows": evaluation.fingerprint,
            "gate": gate.model_dump(mode="json"), "metric": self.metric, "labels": id2label},
            check, extra=lambda result: reports)
        return result, extra["report"]


class ReferenceOutputs:
    """A reference's outputs on the evaluation batches (PyTorch's, or a source graph's): computed
    on first use, cached by model and rows."""

    def __init__(self, cache: StageCache, runner, batches: list, task, progress: Progress,
                 inputs: dict[str, str], name: str = "PyTorch", stage: str = "pytorch-reference") -> None:
        self.cache, self.runner, self.batches, self.task, self.progress = cache, runner, batches, task, progress
        self.inputs, self.name, self.stage = inputs, name, stage
        self._outputs: list[dict] | None = None

    def get(self) -> list[dict]:
        if self._outputs is None:
            self._outputs = self._load_or_compute()
        return self._outputs

    def _load_or_compute(self) -> list[dict]:
        import numpy as np

        key = self.cache.key(self.stage, self.inputs)
        with tempfile.TemporaryDirectory() as tmp:
            if self.cache.load(self.stage, key, Path(tmp)) is not None:
                with np.load(Path(tmp) / "outputs.npz") as data:
                    count = int(data["count"])
                    return [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")}
                            for i in range(count)]
            with self.progress.task(f"{self.name} reference", total=sum(len(b["input_ids"]) for b in self.batches)) as advance:
                outputs = collect(self.runner, self.batches, self.task, advance)
            arrays = {f"{i}/{name}": value for i, batch in enumerate(outputs) for name, value in batch.items()}
            np.savez(Path(tmp) / "outputs.npz", count=np.array(len(outputs)), **arrays)  # type: ignore[arg-type]
            self.cache.store(key, {"outputs.npz": Path(tmp) / "outputs.npz"}, {"extra": {}})
        return outputs
