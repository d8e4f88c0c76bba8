"""The base of every recipe section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Every recipe section: an unknown key is an error that names it."""

    model_config = ConfigDict(extra="forbid")
