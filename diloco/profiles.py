"""Worker profiles: how fast each worker computes and how fast its links are.

A profile gives every worker a relative compute ``speed`` (1 = the reference worker, whose
inner step takes ``workers.step_time_s`` or the measured step time) and a bandwidth factor
applied to ``comm.bandwidth_mbps`` for its upload and download. Presets:

- ``homogeneous``: every worker equal.
- ``straggler``: the last worker ``straggler_slowdown`` times slower (compute and links).
- ``longtail``: speeds and bandwidth factors log-normal with ``sigma``, seeded by
  ``(seed, worker_id)`` so a worker keeps its profile whatever the placement; the median
  worker is the reference.

``workers.speeds`` / ``workers.bandwidth_factors`` lists override the preset per worker.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from diloco.config import ConfigError, WorkersConfig


@dataclass(frozen=True)
class Profiles:
    """Per-worker relative compute speed and link bandwidth factor (global worker order)."""

    speeds: tuple[float, ...]
    bandwidth_factors: tuple[float, ...]


def _lognormal(seed: int, worker: int, stream: str, sigma: float) -> float:
    digest = hashlib.sha256(f"{seed}/{worker}/{stream}".encode()).digest()
    return math.exp(random.Random(digest).gauss(0.0, sigma))


def worker_profiles(cfg: WorkersConfig, seed: int) -> Profiles:
    """The profiles of ``cfg.count`` workers from the preset and per-worker overrides."""
    k = cfg.count
    speeds = [1.0] * k
    links = [1.0] * k
    if cfg.profile == "straggler":
        speeds[-1] = links[-1] = 1.0 / cfg.straggler_slowdown
    elif cfg.profile == "longtail":
        speeds = [_lognormal(seed, i, "speed", cfg.sigma) for i in range(k)]
        links = [_lognormal(seed, i, "link", cfg.sigma) for i in range(k)]
    for key, override, values in (
        ("workers.speeds", cfg.speeds, speeds),
        ("workers.bandwidth_factors", cfg.bandwidth_factors, links),
    ):
        if override is not None:
            if len(override) != k:
                raise ConfigError(key, f"{len(override)} values for workers.count={k}")
            values[:] = override
    return Profiles(tuple(speeds), tuple(links))
