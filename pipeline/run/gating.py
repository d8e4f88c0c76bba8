"""Gating artifacts on the evaluation rows, the one way `run`, phase two and `shipyard validate` do it:
the reference's outputs (PyTorch's, or a pruned source graph's) computed once and cached by model
and batches, and each artifact's validation a cached stage whose key is derived from what
`pipeline.stages.validate.run` is called with."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import Artifact, StageResult
from pipeline.inputs.data import EvalSet
from pipeline.parity.policy import gates_for
from pipeline.parity.runners import OrtRunner, TorchRunner
from pipeline.parity.tasks import Task, collect
from pipeline.progress import Progress
from pipeline.recipe import Gate, Thresholds
from pipeline.run.cache import CachedStages, StageCache, batches_digest
from pipeline.stages import validate


class ReferenceOutputs:
    """A reference's outputs on the evaluation batches (PyTorch's, or a source graph's): computed
    on first use, cached by model and rows."""

    def __init__(self, cache: StageCache, runner, batches: list, task, progress: Progress,
                 inputs: dict[str, str], name: str = "PyTorch", stage: str = "pytorch-reference") -> None:
        self.cache, self.runner, self.batches, self.task, self.progress = cache, runner, batches, task, progress
        self.inputs, self.name, self.stage = inputs, name, stage
        self._outputs: list[dict] | None = None

    def cache_identity(self) -> dict[str, str]:
        """What a validation's cache key records of its reference: the model and batches (not the outputs,
        which a fully cached run never computes)."""
        return self.inputs

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
            self.cache.store(key, {"outputs.npz": Path(tmp) / "outputs.npz"}, {"extra": {}, "stage": self.stage})
        return outputs


@dataclass
class Gating:
    """What judges artifacts: the evaluation rows, the task, the gated metric, the thresholds per
    kind (`pipeline.parity.policy.gates_for`) and the PyTorch model they are compared with."""

    thresholds: Thresholds
    evaluation: EvalSet
    task: Task
    metric: str | None
    labelled: bool
    id2label: dict[int, str]
    torch: TorchRunner
    model_sha: str

    def __post_init__(self) -> None:
        self.batches_digest = batches_digest(self.evaluation.batches)

    def reference_outputs(self, cache: StageCache, progress: Progress) -> ReferenceOutputs:
        return ReferenceOutputs(cache, self.torch, self.evaluation.batches, self.task, progress,
                                {"model": self.model_sha, "batches": self.batches_digest, "task": repr(self.task)})

    def source_outputs(self, source: Artifact, cache: StageCache, progress: Progress) -> ReferenceOutputs:
        """`source`'s ONNX Runtime outputs on the evaluation batches: what artifacts converted from a
        pruned graph are gated against besides PyTorch (`pipeline.parity.policy.gates_for`)."""
        return ReferenceOutputs(cache, OrtRunner(source.path), self.evaluation.batches, self.task, progress,
                                {"model": source.sha256, "batches": self.batches_digest, "task": repr(self.task)},
                                name=source.name, stage="source-outputs")

    def validate(self, artifact: Artifact, stages: CachedStages, reference: ReferenceOutputs,
                 progress: Progress, source: ReferenceOutputs | None = None
                 ) -> tuple[list[StageResult], dict, dict | None]:
        """Gate `artifact` against PyTorch on the evaluation rows and, when it was converted from a
        pruned graph (`source`), against that graph too, each with the gate the policy gives it.
        Returns the stage results and the two parity reports (the second None without a source)."""
        gates = gates_for(self.thresholds, artifact.kind, artifact.precision, source is not None, self.labelled)
        result, report = self._check(artifact, f"validate[{artifact.name}]", stages, reference, gates.reference,
                                     progress)
        if gates.source is None or source is None:
            return [result], report, None
        step, step_report = self._check(artifact, f"validate[{artifact.name} vs {source.name}]", stages, source,
                                        gates.source, progress)
        return [result, step], report, step_report

    def _check(self, artifact: Artifact, stage: str, stages: CachedStages, reference: ReferenceOutputs,
               gate: Gate, progress: Progress) -> tuple[StageResult, dict]:
        evaluation = self.evaluation
        reports: dict[str, dict] = {}

        def check() -> StageResult:
            with progress.task(f"validate {artifact.name} vs {reference.name}", total=len(evaluation.rows)) as advance:
                result, report = validate.run(artifact, reference.get(), evaluation, gate, self.metric, self.id2label,
                                              self.task, advance)
            result.stage = stage
            reports["report"] = {**report.to_dict(), "reference": reference.name}
            return result

        # Keyed by what `validate.run` is called with; the reference by its model and batches.
        identity = stages.identity(validate.run, artifact, reference, evaluation, gate, self.metric, self.id2label,
                                   self.task)
        result, extra = stages.run(stage, identity, check, extra=lambda result: reports)
        return result, extra["report"]
