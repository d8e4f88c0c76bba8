"""How sure a parity figure is: the 95% Wilson interval of an agreement, and McNemar's exact
test of an accuracy change on paired rows.

Written here rather than imported: scipy has both (`binomtest`, `proportion_ci` in statsmodels),
but neither is a dependency of Shipyard, and each is a few lines of arithmetic on counts.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(agreeing: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion `agreeing / total` (95% by default): unlike
    the normal approximation it stays inside [0, 1] and is honest at 100% agreement."""
    if total <= 0:
        return (0.0, 1.0)
    p = agreeing / total
    scale = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / scale
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / scale
    # At 0% or 100% the interval's end is exactly the observed proportion (floats miss it by an ulp).
    return (0.0 if agreeing == 0 else centre - half, 1.0 if agreeing == total else centre + half)


def mcnemar_exact(reference_correct: np.ndarray, artifact_correct: np.ndarray) -> dict[str, float | int]:
    """McNemar's exact test that the artifact's accuracy equals the reference's, on the rows where
    exactly one of them is right: two-sided binomial test of those rows' split against 1/2."""
    reference_only = int(np.sum(reference_correct & ~artifact_correct))
    artifact_only = int(np.sum(artifact_correct & ~reference_correct))
    discordant = reference_only + artifact_only
    tail = sum(math.comb(discordant, i) for i in range(min(reference_only, artifact_only) + 1))
    p_value = min(1.0, 2 * tail / 2**discordant) if discordant else 1.0
    return {"reference_only_correct": reference_only, "artifact_only_correct": artifact_only,
            "p_value": p_value}
