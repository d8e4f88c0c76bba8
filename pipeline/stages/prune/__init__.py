"""Pruning on the ONNX graph: scores, surgery, the plan, and distillation recovery."""

from pipeline.stages.prune.stage import run

__all__ = ["run"]
