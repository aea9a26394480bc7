"""Faults: workers that crash, leave, rejoin or are delayed, at given rounds or at random.

Scheduled events are ``{worker, round, kind}`` with kind ``crash`` (absent from that round
on, inner optimizer state lost), ``leave`` (absent, state kept), ``rejoin`` (present again)
or ``delay`` (present but ``delay_factor`` times slower for that round). ``rate`` adds random
departures: each present worker leaves a round with that probability (seeded by seed, worker
and round) and rejoins ``rejoin_after`` rounds later.

An absent worker runs no inner step and its payload gets weight 0, so the average is over the
workers present (the denominator is the number present, not K). Every sync copies the global
model into every worker's row, absent ones included, so a rejoining worker starts from the
current global model. A round in which nobody is present changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
from dataclasses import dataclass
from typing import Any

from diloco.config import ConfigError, FaultsConfig


@dataclass
class RoundFaults:
    """Who is present this round, who crashed (loses state), and each worker's slowdown."""

    present: list[bool]
    crashed: list[int]
    slowdown: list[float]


class Faults:
    """Replays the schedule round by round (deterministic, so resumable from the round)."""

    def __init__(self, cfg: FaultsConfig, num_workers: int, seed: int) -> None:
        for i, e in enumerate(cfg.events):
            if e.worker >= num_workers:
                raise ConfigError(f"faults.events[{i}].worker={e.worker}", f"< {num_workers}")
        self.cfg, self.k, self.seed = cfg, num_workers, seed

    def check(self, parts: Any) -> None:
        """Workers leave and rejoin between exchanges: rounds of local steps are needed."""
        alg = parts.algorithm
        if (self.cfg.events or self.cfg.rate) and alg.inner_steps < 2:
            raise ConfigError("faults", f"needs rounds of local steps, not {alg.name}")

    def _random_away(self, worker: int, round_: int) -> bool:
        for start in range(max(0, round_ - self.cfg.rejoin_after + 1), round_ + 1):
            digest = hashlib.sha256(f"{self.seed}/{worker}/{start}".encode()).digest()
            if random.Random(digest).random() < self.cfg.rate:
                return True
        return False

    def at(self, round_: int) -> RoundFaults:
        """The faults in effect during round ``round_``."""
        present = [True] * self.k
        crashed: list[int] = []
        slowdown = [1.0] * self.k
        for e in sorted(self.cfg.events, key=lambda e: e.round):
            if e.round > round_:
                break
            if e.kind in ("crash", "leave"):
                present[e.worker] = False
                if e.kind == "crash" and e.round == round_:
                    crashed.append(e.worker)
            elif e.kind == "rejoin":
                present[e.worker] = True
            elif e.round == round_:
                slowdown[e.worker] = self.cfg.delay_factor
        if self.cfg.rate:
            present = [p and not self._random_away(i, round_) for i, p in enumerate(present)]
        return RoundFaults(present, crashed, slowdown)


def kill_self() -> None:
    """SIGKILL this process, and its process group when it leads one (a machine gone).

    diloco.swarm starts each peer as a group leader: its children (hivemind's DHT,
    averagers and p2pd daemon) die with it.
    """
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
