"""Errors a user can cause in the pipeline (see `calibration.errors` for the base class)."""

from calibration.errors import DataError, ShipyardError

__all__ = ["ShipyardError", "DataError", "RecipeError", "ModelError", "ArtifactError", "OutputError"]


class RecipeError(ShipyardError):
    """A recipe file or override is invalid."""


class ModelError(ShipyardError):
    """The model folder is missing, incomplete or not a supported architecture or task."""


class ArtifactError(ShipyardError):
    """An ONNX (or other) artifact is missing, truncated or not a valid model."""


class OutputError(ShipyardError):
    """An output path cannot be written."""
