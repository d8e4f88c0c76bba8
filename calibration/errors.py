"""User-caused errors.

`ShipyardError` lives here, in the lowest package, because `pipeline` depends on `calibration` and
never the other way round. The CLI prints any `ShipyardError` as one line and exits 2; anything
else is a bug and keeps its traceback.
"""


class ShipyardError(Exception):
    """An error the user can fix; the message names the thing and the fix, on one line."""


class DataError(ShipyardError):
    """A data source is missing, empty, malformed or too small for what the recipe asks."""
