"""INT8 quantization: the stage, its candidate forms chosen by measurement, the OpenVINO IR,
per-node sensitivity for the float fallback, activation smoothing."""

from pipeline.stages.quantize.stage import file_name, run

__all__ = ["file_name", "run"]
