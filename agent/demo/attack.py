"""A misbehaving hospital, for the demo and the robustness tests only: what robust strategies
are for. Armed by the environment (`FEDSILO_DEMO_ATTACK`), never by a site's config, and loud
about it in the log.

- `sign-flip`: the update reversed and scaled by 4 (it pushes the model away from where the
  honest sites pull it, harder than any one of them);
- `scale`: the update x 10;
- `inflate`: an honest update, but claiming 100 x its rows, in the statistics step (counts,
  sums and sums of squares alike, so the moments stay plausible) and with every update.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy only where an attack runs: the command line imports ATTACKS
    import numpy as np

ENV = "FEDSILO_DEMO_ATTACK"
ATTACKS = ("sign-flip", "scale", "inflate")
INFLATE = 100


def armed() -> str | None:
    kind = os.environ.get(ENV) or None
    if kind is not None and kind not in ATTACKS:
        from agent.errors import ConfigError

        raise ConfigError(ENV, "", f"must be one of {', '.join(ATTACKS)}; got {kind!r}")
    return kind


def attack_update(kind: str, delta: np.ndarray, n_samples: int) -> tuple[np.ndarray, int]:
    if kind == "sign-flip":
        return (-4.0 * delta).astype(delta.dtype), n_samples
    if kind == "scale":
        return (10.0 * delta).astype(delta.dtype), n_samples
    return delta, n_samples * INFLATE


def attack_moments(kind: str, vector: np.ndarray) -> np.ndarray:
    """Moments [count | sum | sum of squares] per column, inflated alike."""
    return vector * INFLATE if kind == "inflate" else vector
