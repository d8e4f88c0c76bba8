"""The whole recipe: model, data, stages, targets and gates, and the checks across sections."""

from __future__ import annotations

import json
from typing import Literal

import yaml
from pydantic import Field, model_validator

from pipeline.errors import RecipeError
from pipeline.names import KINDS, MetricName
from pipeline.platforms import shipped_trt_versions, tensorrt_for
from pipeline.recipe.base import Strict
from pipeline.recipe.stages import DataSpec, ModelSpec, StagesSpec
from pipeline.recipe.targets import TargetSpec


class Gate(Strict):
    """Parity thresholds for one kind of artifact; a `None` threshold is not checked."""

    min_agreement: float | None = Field(None, ge=0, le=1, description="share of units (rows, tokens) whose "
                                        "prediction equals the reference's")
    min_agreement_lower: float | None = Field(None, ge=0, le=1, description="the lower end of agreement's 95% "
                                              "Wilson interval: passes only when the evaluation rows show it")
    max_abs_diff: float | None = Field(None, ge=0, description="largest |output difference| from the reference")
    max_metric_drop: float | None = Field(
        None, ge=0, le=1, description="fraction: 0.01 is one accuracy point"
    )
    min_speedup: float | None = Field(
        None, gt=0, description="int8 (default 1.0): each CPU INT8 artifact (cpu, openvino) must be at least this many "
        "times as fast as its float source at batch 1 and at the batch size, in every timing round, on the machine "
        "that builds it; null: not checked")
    on_slow: Literal["fail", "keep_float"] = Field(
        "fail", description="when min_speedup is missed: fail the run, or remove that artifact (the float graph or "
        "another CPU artifact is then the CPU form) and say so")


class Thresholds(Strict):
    """Gates per artifact kind; `metric` is the label metric whose drop is gated."""

    metric: MetricName | None = Field(
        None, description="the label metric whose drop is gated; default per task: accuracy, entity_f1 "
        "(token classification), f1 (question answering)")
    min_cosine: float = Field(0.99, gt=0, le=1, description="feature-extraction: a row agrees when the cosine "
                              "of its embedding with PyTorch's is at least this")
    fp32: Gate = Field(default_factory=lambda: Gate(min_agreement=1.0, max_abs_diff=1e-3))
    pruned: Gate = Field(default_factory=lambda: Gate(min_agreement=0.95, max_metric_drop=0.02))
    fp16: Gate = Field(default_factory=lambda: Gate(min_agreement=0.995, max_metric_drop=0.005))
    int8: Gate = Field(default_factory=lambda: Gate(min_agreement=0.98, max_metric_drop=0.01, min_speedup=1.0))

    @model_validator(mode="before")
    @classmethod
    def _int8_speed_default(cls, data: object) -> object:
        """An int8 section that leaves min_speedup out keeps its default, 1.0 (not unset, as the
        other thresholds of a written section are): an INT8 CPU artifact slower than its float
        source fails unless the recipe says null."""
        if isinstance(data, dict) and isinstance(data.get("int8"), dict) and "min_speedup" not in data["int8"]:
            return {**data, "int8": {**data["int8"], "min_speedup": 1.0}}
        return data

    @model_validator(mode="after")
    def _speed_gate_is_int8s(self) -> Thresholds:
        """The speed gate times the CPU INT8 artifact only: one set anywhere else would do nothing."""
        for kind in ("fp32", "pruned", "fp16"):
            gate = getattr(self, kind)
            if gate.min_speedup is not None or gate.on_slow != "fail":
                raise ValueError(f"thresholds.{kind}: min_speedup and on_slow gate the CPU INT8 artifact only; "
                                 "set them under thresholds.int8")
        return self


class Recipe(Strict):
    """A whole release: model, data, stages, target GPUs and gates."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the release's name (default "
                      "output folder: release/NAME)")
    model: ModelSpec
    data: DataSpec
    stages: StagesSpec = Field(default_factory=StagesSpec)
    targets: list[TargetSpec] = Field(default_factory=list)
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @model_validator(mode="after")
    def _labels_for_metric_gates(self) -> Recipe:
        """Without a label column no label metric can be gated: a metric-drop threshold the recipe
        writes is refused, and the defaults become null, so the resolved recipe (as a manifest
        records it) says they were not checked and loads again."""
        if self.data.evaluation_label is None:
            for kind in KINDS:
                gate = getattr(self.thresholds, kind)
                written = kind in self.thresholds.model_fields_set and "max_metric_drop" in gate.model_fields_set
                if written and gate.max_metric_drop is not None:
                    raise ValueError(f"thresholds.{kind}.max_metric_drop needs gold labels; set data.label_column "
                                     "or remove the threshold")
                setattr(self.thresholds, kind, gate.model_copy(update={"max_metric_drop": None}))
        return self

    @model_validator(mode="after")
    def _recovery_has_data(self) -> Recipe:
        prune = self.stages.prune
        if prune.recover.enabled or (prune.budget is not None and prune.budget.recovered):
            what = "stages.prune.recover.enabled" if prune.recover.enabled else "stages.prune.budget.recovered"
            if not prune.enabled:
                raise ValueError(f"{what} recovers a pruned model; set stages.prune.enabled: true")
            if self.data.training is None:
                raise ValueError(f"{what} needs data.training: the text to distil on (the fine-tuning set or "
                                 "unlabeled in-domain text), with path and samples")
        if prune.budget is not None and prune.budget.recovered and not prune.recover.enabled:
            raise ValueError("stages.prune.budget.recovered judges candidates after recovery; set "
                             "stages.prune.recover.enabled: true as well")
        return self

    @model_validator(mode="after")
    def _targets_consistent(self) -> Recipe:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError("targets: names must be unique")
        for target in self.targets:
            if target.precision == "int8" and not (self.stages.quantize.enabled and "qdq" in self.stages.quantize.formats):
                raise ValueError(f"target {target.name}: int8 engines are built from the Q/DQ artifact; "
                                 "enable stages.quantize with format qdq")
            longest = max(p.sequence.max for p in target.profiles)
            if self.data.max_length > longest:
                raise ValueError(f"target {target.name}: data.max_length {self.data.max_length} is longer than "
                                 f"every profile's sequence.max (at most {longest}); raise a profile's "
                                 "sequence.max or lower data.max_length")
            if target.trt_version is None:
                target.trt_version = tensorrt_for(target.arch, self.stages.build.trt_version)
            shipped = shipped_trt_versions()
            if target.trt_version not in shipped:
                raise ValueError(f"target {target.name}: no ONNX operator list for TensorRT {target.trt_version}; "
                                 f"set trt_version to one of {', '.join(shipped)}")
            if target.sparse_weights and not (self.stages.prune.enabled and self.stages.prune.sparsity_24 != "none"):
                raise ValueError(f"target {target.name}: sparse_weights needs 2:4 weights; set "
                                 "stages.prune.enabled and stages.prune.sparsity_24")
        return self

    def target(self, name: str) -> TargetSpec:
        for target in self.targets:
            if target.name == name:
                return target
        known = ", ".join(t.name for t in self.targets) or "none"
        raise RecipeError(f"target {name!r} is not in recipe {self.name!r} (targets: {known})")

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)
