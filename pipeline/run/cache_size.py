"""The stage cache's size cap and the sizes and ages `shipyard cache prune` takes ("20GB", "30d").

Written here: click has no size or duration type, and the few lines do not justify a dependency.
"""

from __future__ import annotations

import os
import re

from pipeline.errors import ShipyardError

DEFAULT_MAX_SIZE = 20 * 10**9  # bytes; SHIPYARD_CACHE_MAX_SIZE sets another ("none": no cap)
MAX_SIZE_ENV = "SHIPYARD_CACHE_MAX_SIZE"
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str, what: str) -> int:
    """Bytes in `text` ("500MB", "20GB", "1.5GiB", "1000"); `what` names the option in the error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ShipyardError(f"{what} {text!r} is not a size; give a number and a unit, e.g. 500MB or 20GB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_age(text: str, what: str) -> float:
    """Seconds in `text` ("90m", "12h", "30d", "2w")."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise ShipyardError(f"{what} {text!r} is not an age; give a number and s, m, h, d or w, e.g. 30d")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def human_size(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def configured_max_size() -> int | None:
    """The cache's size cap: $SHIPYARD_CACHE_MAX_SIZE ("none" for no cap), else 20 GB."""
    value = os.environ.get(MAX_SIZE_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_SIZE
    return None if value.lower() == "none" else parse_size(value, MAX_SIZE_ENV)
