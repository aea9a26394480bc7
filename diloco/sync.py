"""Sync policies: how many inner steps each worker runs before a round's exchange.

- ``all``: every worker runs H steps; the round waits for the slowest (synchronous DiLoCo).
- ``deadline``: a round lasts ``budget * H`` reference steps of time; worker i runs the
  ``floor(budget * H * speed_i)`` steps its speed allows (at most H, so faster workers idle)
  and its payload is weighted by the steps it ran (a worker that ran none is left out).

With equal speeds and ``budget = 1`` both give H steps to every worker, so ``deadline``
equals ``all`` (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def steps_per_worker(policy: str, h: int, speeds: Sequence[float], budget: float) -> list[int]:
    """Inner steps each worker runs in a round of (at most) ``h`` steps."""
    if policy == "all":
        return [h] * len(speeds)
    if policy != "deadline":
        raise ValueError(f"sync={policy} has no rounds of fixed length")
    return [min(h, math.floor(budget * h * s + 1e-9)) for s in speeds]
