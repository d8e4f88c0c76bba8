"""INT8 quantization: the stage, per-node sensitivity for the float fallback, activation smoothing."""

from pipeline.stages.quantize.stage import run

__all__ = ["run"]
