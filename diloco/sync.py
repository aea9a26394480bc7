"""Sync policies: who runs how many inner steps before an exchange, and whose payload counts.

The trainer's one round loop (:meth:`diloco.trainer.Trainer.fit`) asks the policy for a
:class:`RoundPlan` every round and hands the round's timing back to it:

- ``all`` (:class:`All`): every present worker runs H steps; the round waits for the slowest
  (synchronous DiLoCo).
- ``deadline`` (:class:`Deadline`): a round lasts ``budget * H`` reference steps of time;
  worker i runs the ``floor(budget * H * speed_i)`` steps its speed allows (at most H, so
  faster workers idle) and its payload is weighted by the steps it ran (a worker that ran
  none is left out).
- ``async`` (:class:`diloco.asynchronous.Async`): one worker per round pushes when it is done,
  its update weighted by its staleness.

With equal speeds and ``budget = 1`` both ``all`` and ``deadline`` give H steps to every
worker, so ``deadline`` equals ``all`` (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diloco.clock import SimClock
from diloco.comm.base import Communicator
from diloco.config import ConfigError
from diloco.faults import RoundFaults
from diloco.profiles import Profiles


@dataclass
class Progress:
    """Where the run is; shared by the trainer, the policy and the exchange.

    ``step`` counts reference inner steps (modelled time of a worker at speed 1 under any
    policy); ``worker_steps`` the inner steps each worker of the run has run.
    """

    total_steps: int
    num_workers: int
    step: int = 0
    round: int = 0
    worker_steps: torch.Tensor = field(init=False)
    plan: RoundPlan | None = None  # the round being run (not checkpointed: each round sets it)

    def __post_init__(self) -> None:
        self.worker_steps = torch.zeros(self.num_workers, dtype=torch.long)


@dataclass
class RoundPlan:
    """One round: every worker's inner steps, then one exchange of whose payloads.

    Attributes:
        steps: inner steps each worker of the run runs (0: it sits the round out).
        length: inner steps the round lasts (idle workers wait for the others).
        first_step: the step number of the round's first inner step (lr schedule).
        speeds: each worker's compute speed this round (for modelled time).
        weights: ``[K]`` payload weights (steps run), or None for equal weights.
        senders: the workers whose payloads are exchanged and who pull the new model
            afterwards (None: all of them, and every worker resyncs). In one process only,
            and the policy must call ``group.track_origins()`` in ``setup`` (as
            :class:`diloco.asynchronous.Async` does) so the others keep their origins.
        scale: the weight of the aggregate in the outer step (1: a full round).
        log_inner: log train metrics between the round's inner steps.
        metrics: extra metrics of the round (e.g. staleness).
    """

    steps: list[int]
    length: int
    first_step: int
    speeds: list[float]
    weights: torch.Tensor | None = None
    senders: list[int] | None = None
    scale: float = 1.0
    log_inner: bool = True
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundEnd:
    """What a policy needs to account a round's time once its exchange is done.

    ``measured_s``: seconds the round's inner steps took here; ``local_steps``: worker-steps
    they ran in this process; ``overlap_steps``: inner steps the exchange runs behind.
    """

    progress: Progress
    clock: SimClock
    comm: Communicator
    measured_s: float
    local_steps: int
    overlap_steps: int


class SyncPolicy(Protocol):
    """Plans rounds and accounts their modelled time."""

    def setup(self, parts: Any) -> None:
        """Reject what this policy cannot run (one line naming the key); prepare the parts.

        ``parts``: the run's :class:`diloco.build.Parts`.
        """
        ...

    def plan(self, progress: Progress, faults: RoundFaults) -> RoundPlan | None:
        """The next round, or None when the run is over."""
        ...

    def finish(self, plan: RoundPlan, end: RoundEnd) -> tuple[int, bool]:
        """After the round's exchange: advance the clock; the new reference step, and last?"""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Policy state to checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


class All:
    """Every present worker runs the round's H steps; the round waits for the slowest."""

    @dataclass
    class Config:
        """No settings."""

    def __init__(self, cfg: Any, *, inner_steps: int, profiles: Profiles, **_: Any) -> None:
        self.cfg, self.h, self.profiles = cfg, inner_steps, profiles

    def setup(self, parts: Any) -> None:
        """Any algorithm runs in rounds of equal length."""

    def steps_for(self, n: int, speeds: Sequence[float]) -> list[int]:
        """Inner steps each worker runs in a round of ``n`` reference steps."""
        return [n] * len(speeds)

    def plan(self, progress: Progress, faults: RoundFaults) -> RoundPlan | None:
        """H steps (fewer at the end of the run) for every present worker."""
        n = min(self.h, progress.total_steps - progress.step)
        if n <= 0:
            return None
        speeds = [v / d for v, d in zip(self.profiles.speeds, faults.slowdown, strict=True)]
        steps = self.steps_for(n, speeds)
        steps = [s if here else 0 for s, here in zip(steps, faults.present, strict=True)]
        uneven = len(set(steps)) > 1
        weights = torch.tensor(steps, dtype=torch.float32) if uneven else None
        return RoundPlan(steps, n, progress.step, speeds, weights)

    def finish(self, plan: RoundPlan, end: RoundEnd) -> tuple[int, bool]:
        """The slowest worker's compute, then the collectives' network time."""
        end.clock.compute(plan.steps, end.measured_s, plan.speeds, end.local_steps)
        end.clock.exchange(end.comm.drain(), end.comm.num_workers, end.overlap_steps)
        step = end.progress.step + plan.length
        return step, step >= end.progress.total_steps

    def state_dict(self) -> dict[str, Any]:
        """Stateless: rounds follow from the progress."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless."""


class Deadline(All):
    """A round lasts ``budget * H`` reference steps; each worker runs what its speed allows."""

    @dataclass
    class Config:
        """``budget``: the round's length in units of H reference steps."""

        budget: float = field(default=1.0, metadata={"gt": 0.0})

    def setup(self, parts: Any) -> None:
        """Payloads are weighted by steps run: rounds of local steps are needed."""
        alg = parts.algorithm
        if alg.inner_steps < 2:
            raise ConfigError("sync=deadline", f"needs rounds of local steps, not {alg.name}")

    def steps_for(self, n: int, speeds: Sequence[float]) -> list[int]:
        """``min(n, floor(budget * n * speed_i))``."""
        return [min(n, math.floor(self.cfg.budget * n * s + 1e-9)) for s in speeds]
