"""The recipe's model, data and stage sections."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

from pydantic import Field, field_validator

from pipeline.names import (
    MAX_TOKENS,
    CalibrationMethod,
    CpuForm,
    FfnScope,
    Isa,
    OpenvinoForm,
    Padding,
    QuantFormat,
    Sampling,
    Sparsity24,
    TaskName,
    TorchDevice,
)
from pipeline.platforms import TRT_VERSION
from pipeline.recipe.base import Strict


class ModelSpec(Strict):
    """The fine-tuned model: a local Hugging Face folder with config, weights and tokenizer."""

    path: Path = Field(description="the model folder (config.json, safetensors weights, tokenizer); relative to "
                       "the recipe file, ~ expanded")
    task: TaskName | None = Field(None, description="as Optimum names it; default: read from config.json's "
                                  "architectures (…ForTokenClassification -> token-classification, …Model -> "
                                  "feature-extraction)")
    max_answer_tokens: int = Field(30, ge=1, le=512, description="question-answering: longest answer span")
    allow_pickle: bool = Field(False, description="accept pytorch_model.bin (pickle) weights, loaded with "
                               "torch.load(weights_only=True); default: safetensors only")
    device: TorchDevice = Field(
        "auto", description="where PyTorch runs the model (the reference outputs and recovery's distillation): auto "
        "is the first CUDA device when torch sees one, else the CPU; recorded in the manifest (model.device)")


class SourceSpec(Strict):
    """One data file or saved dataset folder, how many rows to draw from it and, where they differ
    from the data section's, its own column names."""

    path: Path = Field(description=".csv, .jsonl, .txt (one text a line), .parquet or a datasets save_to_disk "
                       "folder; relative to the recipe file")
    samples: int = Field(gt=0, description="rows to draw; fewer available is an error")
    text_column: str | None = Field(None, description="default: data.text_column")
    text_pair_column: str | None = Field(None, description="default: data.text_pair_column")
    label_column: str | None = Field(None, description="default: data.label_column (calibration: only if the "
                                     "source has that column; calibration needs no labels)")
    encoding: str | None = Field(None, description=".csv/.txt text encoding (a Python codec name); default UTF-8")


class DataSpec(Strict):
    """Calibration and evaluation data: drawn seeded and disjoint, tokenized like the model's."""

    calibration: SourceSpec
    evaluation: SourceSpec
    text_column: str = Field("text", description="the text; a list of words for token classification, the "
                             "question for question answering")
    text_pair_column: str | None = Field(None, description="second text; the context for question answering")
    label_column: str | None = Field(
        None, description="gold labels enable the metric gates: a class per row, a list of IOB2 tags per word "
        "(token classification) or the answer text(s) (question answering)")
    max_length: int = Field(128, ge=8, le=MAX_TOKENS, description="tokens per row, at most the model's "
                            "positions (512 for BERT, 8,192 for ModernBERT); longer rows are truncated")
    padding: Padding = Field(
        "max_length", description="evaluation and tuning batches, and calibration batches with the minmax "
        "calibrator (longest: rows ordered by length, each batch padded to its longest row); entropy and "
        "percentile calibrate on max_length batches, since they stack every batch's activations"
    )
    sampling: Sampling = Field("stratified", description="stratified keeps the label shares of each source "
                               "(with a label column); random draws uniformly")
    seed: int = Field(0, description="seeds every draw of rows")
    batch_size: int = Field(32, gt=0, description="rows per batch for calibration, tuning and evaluation")
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


class ExportSpec(Strict):
    """Optimum ONNX export, validated against PyTorch as a hard gate."""

    opset: int = Field(17, ge=14, le=21, description="ONNX opset of the export; TensorRT-ready float16 "
                       "graphs with INT8 are converted to opset 19")
    atol: float = Field(1e-4, gt=0, description="max |logit difference| allowed vs PyTorch")
    validation_samples: int = Field(64, gt=0, description="evaluation rows used by the export gate")


class FallbackSpec(Strict):
    """Keep the most INT8-sensitive nodes (ranked on the calibration rows) in float until agreement on the tuning rows is reached."""

    min_agreement: float = Field(
        0.985, ge=0, le=1, description="agreement with the FP32 graph on the tuning rows"
    )
    max_nodes: int = Field(8, ge=0, description="most nodes kept in float; 0 quantizes all")


class SmoothingSpec(Strict):
    """SmoothQuant-style activation smoothing before INT8 (pipeline/stages/quantize/smooth.py): exact in float."""

    # Measured with bench/smoothing.py on the demo and the embeddings demo: with the float fallback
    # it raised Q/DQ agreement (0.983 -> 0.988, 0.9955 -> 1.0, same float nodes) and lowered the
    # CPU form's (0.984 -> 0.977, 0.9975 -> 0.920): dynamic INT8 gains nothing from narrower
    # activations and loses on the wider weight columns. So it is on for qdq only.
    formats: list[QuantFormat] = Field(default_factory=lambda: list[QuantFormat](["qdq"]),
                                       description="the INT8 forms made from the smoothed graph")
    alpha: float = Field(0.5, ge=0, le=1, description="how much of each channel's range moves from the activation "
                         "into the weights (0: none, 1: all)")
    # Measured on the demo's pruned graph, no node in float, 256 tuning rows: agreement with it
    # 0.9883 at NNCF's default 0.95, 0.9961 at 0.9, 1.0 at 0.8, 0.9961 at 0.7, 0.9766 at 0.5; the
    # same speed at each. Before, the fallback kept 2 FFN MatMuls in float instead (5% slower).
    nncf_alphas: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.95, 0.9, 0.8, 0.7], min_length=1,
        description="NNCF's SmoothQuant alphas the openvino nncf form tries, in order, with no node in float, before "
        "the fallback keeps nodes in float (0.95: NNCF's default; the alpha costs no speed)")


class QuantizeSpec(Strict):
    """Post-training INT8 quantization with calibration data."""

    enabled: bool = Field(True, description="make the INT8 artifacts")
    formats: list[QuantFormat] = Field(default_factory=lambda: list[QuantFormat](["qdq", "cpu"]), min_length=1,
                                       description="qdq: explicit Q/DQ ONNX for TensorRT; cpu: ONNX Runtime graph "
                                       "with dynamic INT8; openvino: OpenVINO IR (the openvino extra)")
    cpu_forms: list[CpuForm] = Field(
        default_factory=lambda: list[CpuForm](get_args(CpuForm)), min_length=1,
        description="the cpu format's candidates: each is quantized with the float fallback, timed on this machine, "
        "and the fastest that meets fallback.min_agreement on the tuning rows ships (all recorded); "
        "float-embeddings leaves the embedding tables in float (larger, sometimes fewer float layers)")
    openvino_forms: list[OpenvinoForm] = Field(
        default_factory=lambda: list[OpenvinoForm](["nncf", "qdq"]), min_length=1,
        description="the openvino format's candidates: nncf (NNCF static INT8 of the float graph) and qdq (the Q/DQ "
        "graph read by OpenVINO), chosen as cpu_forms are")
    deploy_isa: Isa | None = Field(
        None, description="the deployment CPU's instruction set (avx2, avx512_vnni, amx); when this machine lacks it, "
        "the run says the CPU forms were timed here, not there")
    method: CalibrationMethod = Field("minmax", description="how activation ranges are calibrated (ONNX Runtime's "
                                      "calibrators; entropy at TensorRT's 2,048 bins, slow and hard on BERT's "
                                      "attention probabilities: docs/quantization.md)")
    percentile: float = Field(99.999, gt=90, lt=100, description="used by method=percentile")
    fallback: FallbackSpec = Field(default_factory=FallbackSpec)
    smoothing: SmoothingSpec = Field(default_factory=SmoothingSpec)

    @field_validator("formats")
    @classmethod
    def _unique(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError("formats must not repeat")
        return formats


class BudgetSpec(Strict):
    """Search the largest FFN fraction whose agreement with PyTorch stays within budget."""

    min_agreement: float = Field(0.97, ge=0, le=1, description="agreement with the FP32 graph on the tuning rows")
    max_fraction: float = Field(0.6, gt=0, lt=1, description="the largest FFN fraction tried")
    steps: int = Field(5, ge=1, le=12, description="bisection steps after the end points")
    recovered: bool = Field(
        False, description="judge each candidate after recovery (stages.prune.recover's settings, at most "
        "trial_steps steps): the search finds the amount whose recovered model meets the budget")
    trial_steps: int = Field(150, ge=1, description="recovery steps per candidate when recovered is set")


class RecoverSpec(Strict):
    """Knowledge distillation from the original PyTorch model into the pruned structure (`shipyard recover`)."""

    enabled: bool = Field(False, description="distil after pruning; needs data.training")
    epochs: int = Field(1, ge=1, description="passes over the training rows (max_steps stops sooner)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate")
    batch_size: int = Field(16, ge=1, description="training rows per step")
    temperature: float = Field(2.0, gt=0, description="softens teacher and student logits in the KL term")
    label_weight: float = Field(0.5, ge=0, le=1, description="share of the loss from gold labels (text "
                                "classification, when the training data has them)")
    hidden_weight: float = Field(0.0, ge=0, description="weight of intermediate-layer matching (every layer's "
                                 "hidden state against the original's) added to the output loss")
    dropout: bool = Field(False, description="train the student with the model's dropout; off by default: "
                          "distillation fits the original's function (docs/benchmarks.md, Recovery)")
    eval_every: int = Field(50, ge=1, description="steps between checks on the tuning split")
    patience: int = Field(4, ge=1, description="checks that come no closer to the original before training stops")
    tuning_samples: int = Field(256, ge=8, description="rows of the training data held out for early stopping")
    seed: int = Field(0, description="seeds the training order and the held-out split")


class PruneSpec(Strict):
    """Structured pruning of the ONNX graph, scored on calibration data."""

    enabled: bool = Field(False, description="prune the exported graph")
    ffn_fraction: float = Field(0.0, ge=0, lt=1, description="share of FFN neurons removed")
    ffn_scope: FfnScope = Field("uniform", description="uniform: the fraction in every layer; global: lowest "
                                "scores across layers, at least 5% kept per layer")
    # Matrix kernels work in blocks of columns: measured with OpenVINO's INT8 on AVX-512 VNNI at batch
    # 32, the demo's FFN input products at 1,459 neurons (5% removed) took as long as at 1,536, and 7%
    # less at 1,472 (23 x 64). TensorRT's tensor-core tiles favour such widths too.
    ffn_multiple: int = Field(1, ge=1, description="each layer keeps a multiple of this many FFN neurons, the one "
                              "nearest what ffn_fraction leaves (at least one multiple); 64 suits CPU and GPU kernels")
    heads_per_layer: int = Field(0, ge=0, description="lowest-scored heads removed per layer")
    heads: dict[int, list[int]] | None = Field(None, description="exact heads to remove per layer")
    sparsity_24: Sparsity24 = Field("none", description="2:4 sparsity (2 of every 4 weights kept) in these "
                                    "projections, for sparse TensorRT kernels")
    compensate: bool = Field(
        True, description="fold removed units' mean output into the next bias (needs calibration data)"
    )
    budget: BudgetSpec | None = None
    recover: RecoverSpec = Field(default_factory=RecoverSpec)


class BuildSpec(Strict):
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


class PackageSpec(Strict):
    """A Triton model repository written beside the release once it is made (`shipyard package`)."""

    triton: bool = Field(False, description="write `<out>.triton/`, a Triton model repository of the release")
    python_runtime: bool = Field(False, description="serve the ONNX artifacts with Python-backend models running "
                                 "ONNX Runtime (a server with only the Python backend)")


class StagesSpec(Strict):
    export: ExportSpec = Field(default_factory=ExportSpec)
    prune: PruneSpec = Field(default_factory=PruneSpec)
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    build: BuildSpec = Field(default_factory=BuildSpec)
    package: PackageSpec = Field(default_factory=PackageSpec)
