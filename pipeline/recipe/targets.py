"""The recipe's targets: a GPU or Jetson, its precision, shape profiles and builder settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline.names import MAX_TOKENS, Precision
from pipeline.platforms import ARCHITECTURES, JETSON_ARCHS, PLATFORMS, Arch, arch_error, platform_error, tensorrt_for
from pipeline.recipe.base import Strict


class Range(Strict):
    """min <= opt <= max of one dynamic axis."""

    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self


class ProfileSpec(Strict):
    """One TensorRT optimization profile: the batch and sequence ranges an engine accepts."""

    batch: Range
    sequence: Range

    @model_validator(mode="after")
    def _within_longest_context(self) -> ProfileSpec:
        # The family's own limit (512 for BERT, 8,192 for ModernBERT) is the model's positions,
        # checked against every target when a run starts (`pipeline.run.context`).
        if self.sequence.max > MAX_TOKENS:
            raise ValueError(f"sequence.max must be <= {MAX_TOKENS} (the longest context of a supported family)")
        return self


class TargetSpec(Strict):
    """One GPU a release ships an engine for; engines are built on a GPU of this architecture."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="names the target in the "
                      "manifest, --target and engines/NAME.engine")
    platform: str | None = Field(None, description="a platform preset (shipyard targets lists them: "
                                 + ", ".join(PLATFORMS) + "): sets arch and the default trt_version, and "
                                 "refuses a TensorRT, DLA or architecture the platform does not have")
    arch: Arch = Field(description="compute capability (set by platform when it is given): "
                       + ", ".join(f"{k} {v}" for k, v in ARCHITECTURES.items()))
    precision: Precision = Field(description="fp32: the FP32 graph; fp16: a converted float16 graph; int8: the "
                                 "Q/DQ graph (its float layers in non_quantized)")
    non_quantized: Literal["fp16", "fp32"] = Field(
        "fp16", description="int8 targets: precision of the layers the Q/DQ graph leaves in float")
    output_dtype: Literal["fp32", "fp16"] = Field("fp32", description="type of the logits output")
    profiles: list[ProfileSpec] = Field(min_length=1)
    workspace_mb: int = Field(2048, gt=0, description="builder workspace memory pool limit")
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimization level")
    timing_cache: Path | None = Field(None, description="loaded if present, saved after the build")
    hardware_compatibility: Literal["none", "ampere_plus"] = Field(
        "none", description="ampere_plus: one engine runs on every sm_80+ desktop/server GPU (slower)")
    version_compatible: bool = Field(False, description="an engine later TensorRT versions of the same major load")
    sparse_weights: bool = Field(False, description="needs stages.prune.sparsity_24 != none")
    rebuild_check: bool = Field(
        False, description="build the engine twice with the same timing cache and record whether the bytes match "
        "(TensorRT does not promise byte-identical rebuilds; what ships is always the engine hashed and gated)")
    dla_core: int | None = Field(None, ge=0, description="Jetson DLA core; other layers fall back to the GPU; "
                                 "every profile must be static (min = opt = max)")
    trt_version: str | None = Field(
        None, pattern=r"^\d+\.\d+$", description="TensorRT (major.minor) the engine is built with and runs on: "
        "its ONNX operator list checks the graph, and a build under another TensorRT is refused; default: the "
        "platform's, else JetPack 6's 10.3 for sm_87 and JetPack 7's 10.13 for sm_110, else stages.build.trt_version")

    @property
    def tensorrt(self) -> str:
        """The TensorRT version (major.minor) this target's engine is built with and runs on."""
        return self.trt_version or tensorrt_for(self.arch)

    @model_validator(mode="before")
    @classmethod
    def _platform(cls, data: object) -> object:
        """A platform preset fills arch and the default TensorRT, and refuses what it cannot run."""
        if not isinstance(data, dict) or data.get("platform") is None:
            return data
        name = str(data["platform"])
        error = platform_error(name, data.get("arch"), data.get("trt_version"), data.get("dla_core") is not None)
        if error:
            raise ValueError(error)
        platform = PLATFORMS[name]
        return {**data, "arch": platform.arch, "trt_version": data.get("trt_version") or platform.default_trt}

    @model_validator(mode="after")
    def _consistent(self) -> TargetSpec:
        if self.trt_version is not None and (error := arch_error(self.arch, self.trt_version)):
            raise ValueError(error)
        if self.hardware_compatibility == "ampere_plus" and (self.arch == "sm_75" or self.arch in JETSON_ARCHS):
            raise ValueError(f"hardware_compatibility ampere_plus needs a desktop/server GPU of sm_80 or "
                             f"newer, not {self.arch}; set it to none")
        if self.output_dtype == "fp16" and (self.precision == "fp32" or
                                            (self.precision == "int8" and self.non_quantized == "fp32")):
            raise ValueError("output_dtype fp16 needs float16 layers; use precision fp16, or int8 with "
                             "non_quantized fp16")
        if self.dla_core is not None:
            dla = sorted({p.arch for p in PLATFORMS.values() if p.dla})
            if self.arch not in dla:
                raise ValueError(f"dla_core: {self.arch} has no DLA; DLA is on Jetson Orin ({', '.join(dla)})")
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
