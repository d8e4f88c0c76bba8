"""The one recipe schema: what to ship, from which data, through which stages, held to which gates.

A recipe is YAML validated by these pydantic models (`extra="forbid"`, so a misspelt key is an
error that names it). `load_recipe` reads a file, applies `--set key=value` overrides and resolves
relative paths against the recipe's folder, so the resolved recipe in a manifest reruns anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import RecipeError

SUPPORTED_TASKS = ("text-classification", "token-classification", "question-answering", "feature-extraction")
TaskName = Literal["text-classification", "token-classification", "question-answering", "feature-extraction"]
MetricName = Literal["accuracy", "macro_f1", "entity_f1", "token_accuracy", "f1", "exact_match"]
QuantFormat = Literal["qdq", "cpu"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
TRT_VERSION = "10.15"  # the TensorRT in the Dockerfile's base image; its operator list ships as data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """The fine-tuned model: a local Hugging Face folder with config, weights and tokenizer."""

    path: Path
    task: TaskName | None = Field(None, description="as Optimum names it; default: read from config.json's "
                                  "architectures (…ForTokenClassification -> token-classification, …Model -> "
                                  "feature-extraction)")
    max_answer_tokens: int = Field(30, ge=1, le=512, description="question-answering: longest answer span")
    allow_pickle: bool = Field(False, description="accept pytorch_model.bin (pickle) weights, loaded with "
                               "torch.load(weights_only=True); default: safetensors only")


class SourceSpec(_Strict):
    """One data file or saved dataset folder, how many rows to draw from it and, where they differ
    from the data section's, its own column names."""

    path: Path
    samples: int = Field(gt=0, description="rows to draw; fewer available is an error")
    text_column: str | None = Field(None, description="default: data.text_column")
    text_pair_column: str | None = Field(None, description="default: data.text_pair_column")
    label_column: str | None = Field(None, description="default: data.label_column (calibration: only if the "
                                     "source has that column; calibration needs no labels)")
    encoding: str | None = Field(None, description=".csv/.txt text encoding (a Python codec name); default UTF-8")


class DataSpec(_Strict):
    """Calibration and evaluation data: drawn seeded and disjoint, tokenized like the model's."""

    calibration: SourceSpec
    evaluation: SourceSpec
    text_column: str = Field("text", description="the text; a list of words for token classification, the "
                             "question for question answering")
    text_pair_column: str | None = Field(None, description="second text; the context for question answering")
    label_column: str | None = Field(
        None, description="gold labels enable the metric gates: a class per row, a list of IOB2 tags per word "
        "(token classification) or the answer text(s) (question answering)")
    max_length: int = Field(128, ge=8, le=512)
    padding: Literal["max_length", "longest"] = Field(
        "max_length", description="evaluation and tuning batches (longest: rows ordered by length, each batch "
        "padded to its longest row); calibration batches are always max_length"
    )
    sampling: Literal["random", "stratified"] = "stratified"
    seed: int = 0
    batch_size: int = Field(32, gt=0)
    tuning_samples: int = Field(
        256, ge=0, description="rows drawn from the calibration source after the calibration rows; they choose "
        "the prune budget and the INT8 float fallback, so the evaluation rows only ever judge")
    training: SourceSpec | None = Field(
        None, description="text stages.prune.recover distils on: the fine-tuning set or unlabeled in-domain text "
        "(labels are used when the source has the label column); evaluation and tuning rows are left out")

    @property
    def evaluation_label(self) -> str | None:
        """The evaluation source's gold-label column, if any: what the metric gates need."""
        return self.evaluation.label_column or self.label_column


class ExportSpec(_Strict):
    """Optimum ONNX export, validated against PyTorch as a hard gate."""

    opset: int = Field(17, ge=14, le=21)
    atol: float = Field(1e-4, gt=0, description="max |logit difference| allowed vs PyTorch")
    validation_samples: int = Field(64, gt=0, description="evaluation rows used by the export gate")


class FallbackSpec(_Strict):
    """Keep the most INT8-sensitive nodes in float until calibration-row agreement is reached."""

    min_agreement: float = Field(
        0.985, ge=0, le=1, description="agreement with the FP32 graph on the tuning rows"
    )
    max_nodes: int = Field(8, ge=0, description="most nodes kept in float; 0 quantizes all")


class SmoothingSpec(_Strict):
    """SmoothQuant-style activation smoothing before INT8 (pipeline/stages/quantize/smooth.py): exact in float."""

    # Measured with bench/smoothing.py on the demo and the embeddings demo: with the float fallback
    # it raised Q/DQ agreement (0.983 -> 0.988, 0.9955 -> 1.0, same float nodes) and lowered the
    # CPU form's (0.984 -> 0.977, 0.9975 -> 0.920): dynamic INT8 gains nothing from narrower
    # activations and loses on the wider weight columns. So it is on for qdq only.
    formats: list[QuantFormat] = Field(default_factory=lambda: ["qdq"],
                                       description="the INT8 forms made from the smoothed graph")
    alpha: float = Field(0.5, ge=0, le=1, description="how much of each channel's range moves from the activation "
                         "into the weights (0: none, 1: all)")


class QuantizeSpec(_Strict):
    """Post-training INT8 quantization with calibration data."""

    enabled: bool = True
    formats: list[QuantFormat] = Field(default_factory=lambda: ["qdq", "cpu"], min_length=1)
    method: CalibrationMethod = "minmax"
    percentile: float = Field(99.999, gt=90, lt=100, description="used by method=percentile")
    fallback: FallbackSpec = Field(default_factory=FallbackSpec)
    smoothing: SmoothingSpec = Field(default_factory=SmoothingSpec)

    @field_validator("formats")
    @classmethod
    def _unique(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError("formats must not repeat")
        return formats


class BudgetSpec(_Strict):
    """Search the largest FFN fraction whose agreement with PyTorch stays within budget."""

    min_agreement: float = Field(0.97, ge=0, le=1, description="agreement with the FP32 graph on the tuning rows")
    max_fraction: float = Field(0.6, gt=0, lt=1)
    steps: int = Field(5, ge=1, le=12, description="bisection steps after the end points")
    recovered: bool = Field(
        False, description="judge each candidate after recovery (stages.prune.recover's settings, at most "
        "trial_steps steps): the search finds the amount whose recovered model meets the budget")
    trial_steps: int = Field(150, ge=1, description="recovery steps per candidate when recovered is set")


class RecoverSpec(_Strict):
    """Knowledge distillation from the original PyTorch model into the pruned structure (`shipyard recover`)."""

    enabled: bool = False
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    temperature: float = Field(2.0, gt=0, description="softens teacher and student logits in the KL term")
    label_weight: float = Field(0.5, ge=0, le=1, description="share of the loss from gold labels (text "
                                "classification, when the training data has them)")
    hidden_weight: float = Field(0.0, ge=0, description="weight of intermediate-layer matching (every layer's "
                                 "hidden state against the original's) added to the output loss")
    dropout: bool = Field(False, description="train the student with the model's dropout; off by default: "
                          "distillation fits the original's function (README, Recovery: the measurements)")
    eval_every: int = Field(50, ge=1, description="steps between checks on the tuning split")
    patience: int = Field(4, ge=1, description="checks that come no closer to the original before training stops")
    tuning_samples: int = Field(256, ge=8, description="rows of the training data held out for early stopping")
    seed: int = 0


class PruneSpec(_Strict):
    """Structured pruning of the ONNX graph, scored on calibration data."""

    enabled: bool = False
    ffn_fraction: float = Field(0.0, ge=0, lt=1, description="share of FFN neurons removed")
    ffn_scope: Literal["uniform", "global"] = "uniform"
    heads_per_layer: int = Field(0, ge=0, description="lowest-scored heads removed per layer")
    heads: dict[int, list[int]] | None = Field(None, description="exact heads to remove per layer")
    sparsity_24: Literal["none", "ffn", "attention", "all"] = "none"
    compensate: bool = Field(
        True, description="fold removed units' mean output into the next bias (needs calibration data)"
    )
    budget: BudgetSpec | None = None
    recover: RecoverSpec = Field(default_factory=RecoverSpec)


class BuildSpec(_Strict):
    """TensorRT engine builds for `targets` (they need TensorRT and a GPU of the target's architecture)."""

    require_engines: bool = Field(
        False, description="fail (exit 2) up front where an engine cannot be built, instead of "
        "recording the engine step as 'needs a GPU host'",
    )
    trt_version: str = Field(
        TRT_VERSION, pattern=r"^\d+\.\d+$",
        description="TensorRT version of targets that name none and whose architecture has no default "
        "(sm_87: JetPack 6's 10.3): its ONNX operator list checks their graphs",
    )


class StagesSpec(_Strict):
    export: ExportSpec = Field(default_factory=ExportSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    build: BuildSpec = Field(default_factory=BuildSpec)


# Compute capability -> what NVIDIA calls the GPUs built on it (for messages and plans).
ARCHITECTURES = {
    "sm_75": "Turing (T4)", "sm_80": "Ampere (A100, A30)", "sm_86": "Ampere (A10, A40, RTX 30)",
    "sm_87": "Ampere embedded (Jetson AGX/NX Orin)", "sm_89": "Ada (L4, L40, RTX 40)",
    "sm_90": "Hopper (H100, H200)", "sm_100": "Blackwell (B200, GB200)", "sm_103": "Blackwell Ultra (B300, GB300)",
    "sm_120": "Blackwell (RTX PRO 6000, RTX 50)",
}
Arch = Literal["sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_120"]
# The TensorRT a target's engine is built with and runs on, where it is not the image's: Jetson Orin
# runs JetPack 6, whose TensorRT is 10.3 (engines do not load across TensorRT versions).
TRT_BY_ARCH = {"sm_87": "10.3"}
JETSON_ARCHS = ("sm_87",)


class Range(_Strict):
    """min <= opt <= max of one dynamic axis."""

    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self


class ProfileSpec(_Strict):
    """One TensorRT optimization profile: the batch and sequence ranges an engine accepts."""

    batch: Range
    sequence: Range

    @model_validator(mode="after")
    def _within_bert(self) -> "ProfileSpec":
        if self.sequence.max > 512:
            raise ValueError("sequence.max must be <= 512 (BERT's position embeddings)")
        return self


class TargetSpec(_Strict):
    """One GPU a release ships an engine for; engines are built on a GPU of this architecture."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    arch: Arch = Field(description="compute capability: " + ", ".join(f"{k} {v}" for k, v in ARCHITECTURES.items()))
    precision: Literal["fp32", "fp16", "int8"]
    non_quantized: Literal["fp16", "fp32"] = Field(
        "fp16", description="int8 targets: precision of the layers the Q/DQ graph leaves in float")
    output_dtype: Literal["fp32", "fp16"] = Field("fp32", description="type of the logits output")
    profiles: list[ProfileSpec] = Field(min_length=1)
    workspace_mb: int = Field(2048, gt=0, description="builder workspace memory pool limit")
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimization level")
    timing_cache: Path | None = Field(None, description="loaded if present, saved after the build")
    hardware_compatibility: Literal["none", "ampere_plus"] = "none"
    version_compatible: bool = False
    sparse_weights: bool = Field(False, description="needs stages.prune.sparsity_24 != none")
    dla_core: int | None = Field(None, ge=0, description="Jetson DLA core; other layers fall back to the GPU; "
                                 "every profile must be static (min = opt = max)")
    trt_version: str | None = Field(
        None, pattern=r"^\d+\.\d+$", description="TensorRT (major.minor) the engine is built with and runs on: "
        "its ONNX operator list checks the graph, and a build under another TensorRT is refused; default: "
        "JetPack 6's 10.3 for sm_87, else stages.build.trt_version")

    @property
    def tensorrt(self) -> str:
        """The TensorRT version (major.minor) this target's engine is built with and runs on."""
        return self.trt_version or TRT_BY_ARCH.get(self.arch, TRT_VERSION)

    @model_validator(mode="after")
    def _consistent(self) -> "TargetSpec":
        if self.hardware_compatibility == "ampere_plus" and (self.arch == "sm_75" or self.arch in JETSON_ARCHS):
            raise ValueError(f"hardware_compatibility ampere_plus needs a desktop/server GPU of sm_80 or "
                             f"newer, not {self.arch}; set it to none")
        if self.output_dtype == "fp16" and (self.precision == "fp32" or
                                            (self.precision == "int8" and self.non_quantized == "fp32")):
            raise ValueError("output_dtype fp16 needs float16 layers; use precision fp16, or int8 with "
                             "non_quantized fp16")
        if self.dla_core is not None:
            if self.arch not in JETSON_ARCHS:
                raise ValueError(f"dla_core: {self.arch} has no DLA; DLA is on Jetson ({', '.join(JETSON_ARCHS)})")
            if self.precision == "fp32":
                raise ValueError("dla_core: DLA runs fp16 or int8, not fp32; change precision")
            if self.hardware_compatibility != "none":
                raise ValueError("dla_core: DLA engines cannot be hardware-compatible; set hardware_compatibility: none")
            for i, profile in enumerate(self.profiles):
                for label in ("batch", "sequence"):
                    axis = getattr(profile, label)
                    if not axis.min == axis.opt == axis.max:
                        raise ValueError(f"dla_core: the DLA runs static shapes only; profile {i} {label} is "
                                         f"{axis.min}/{axis.opt}/{axis.max}: set min = opt = max (the runner pads "
                                         "shorter batches and splits longer ones)")
        return self


class Gate(_Strict):
    """Parity thresholds for one kind of artifact; a `None` threshold is not checked."""

    min_agreement: float | None = Field(None, ge=0, le=1)
    max_abs_diff: float | None = Field(None, ge=0)
    max_metric_drop: float | None = Field(
        None, ge=0, le=1, description="fraction: 0.01 is one accuracy point"
    )


class Thresholds(_Strict):
    """Gates per artifact kind; `metric` is the label metric whose drop is gated."""

    metric: MetricName | None = Field(
        None, description="the label metric whose drop is gated; default per task: accuracy, entity_f1 "
        "(token classification), f1 (question answering)")
    min_cosine: float = Field(0.99, gt=0, le=1, description="feature-extraction: a row agrees when the cosine "
                              "of its embedding with PyTorch's is at least this")
    fp32: Gate = Field(default_factory=lambda: Gate(min_agreement=1.0, max_abs_diff=1e-3))
    pruned: Gate = Field(default_factory=lambda: Gate(min_agreement=0.95, max_metric_drop=0.02))
    fp16: Gate = Field(default_factory=lambda: Gate(min_agreement=0.995, max_metric_drop=0.005))
    int8: Gate = Field(default_factory=lambda: Gate(min_agreement=0.98, max_metric_drop=0.01))


class Recipe(_Strict):
    """A whole release: model, data, stages, target GPUs and gates."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSpec
    data: DataSpec
    stages: StagesSpec = Field(default_factory=StagesSpec)
    targets: list[TargetSpec] = Field(default_factory=list)
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @model_validator(mode="after")
    def _labels_for_metric_gates(self) -> "Recipe":
        """Without a label column no label metric can be gated: a metric-drop threshold the recipe
        writes is refused, and the defaults become null, so the resolved recipe (as a manifest
        records it) says they were not checked and loads again."""
        if self.data.evaluation_label is None:
            for kind in ("fp32", "pruned", "fp16", "int8"):
                gate = getattr(self.thresholds, kind)
                written = kind in self.thresholds.model_fields_set and "max_metric_drop" in gate.model_fields_set
                if written and gate.max_metric_drop is not None:
                    raise ValueError(f"thresholds.{kind}.max_metric_drop needs gold labels; set data.label_column "
                                     "or remove the threshold")
                setattr(self.thresholds, kind, gate.model_copy(update={"max_metric_drop": None}))
        return self

    @model_validator(mode="after")
    def _recovery_has_data(self) -> "Recipe":
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
    def _targets_consistent(self) -> "Recipe":
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
                target.trt_version = TRT_BY_ARCH.get(target.arch, self.stages.build.trt_version)
            shipped = _shipped_trt_versions()
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


def _shipped_trt_versions() -> list[str]:
    """TensorRT versions whose ONNX operator list ships in pipeline/trt/ops/."""
    folder = Path(__file__).parent / "trt" / "ops"
    return sorted((p.stem for p in folder.glob("*.json")), key=lambda v: tuple(int(x) for x in v.split(".")))


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {assignment!r}: expected key=value, e.g. --set data.max_length=64")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {part!r} is not a section of the recipe")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "recipe"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling against recipes/recipe.schema.json"
    return f"{source}: {where}: {msg}{more}"


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    recipe.model.path = resolve(recipe.model.path)
    recipe.data.calibration.path = resolve(recipe.data.calibration.path)
    recipe.data.evaluation.path = resolve(recipe.data.evaluation.path)
    if recipe.data.training is not None:
        recipe.data.training.path = resolve(recipe.data.training.path)
    for target in recipe.targets:
        if target.timing_cache is not None:
            target.timing_cache = resolve(target.timing_cache)
    return recipe


def parse_recipe(raw: Any, source: str, base: Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Validate a recipe dict (after overrides) and resolve its paths against `base`."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with name, model and data")
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(source, err)) from None
    return _resolve_paths(recipe, base)


def load_recipe(path: Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe file; relative paths in it are relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found; pass the path of a YAML recipe file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {path}{line}: not valid YAML; fix the syntax") from None
    return parse_recipe(raw, str(path), path.resolve().parent, overrides)


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe, as committed in recipes/recipe.schema.json."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Shipyard recipe"
    return schema
