"""Data-parallel training: gradients averaged every step before the inner step."""

from __future__ import annotations

from dataclasses import dataclass

from diloco.algorithms.base import AlgorithmBase, StepContext
from diloco.workers import WorkerGroup


class DDP(AlgorithmBase):
    """Synchronous data parallelism (all-reduce of gradients each step).

    Update rule, per step: ``g = mean_i grad_i``; every worker steps its inner optimizer on
    ``g``. Workers start equal and see the same averaged gradient, so they stay equal, and the
    run equals one worker training on a batch K times larger.
    """

    @dataclass
    class Config:
        """DDP has no settings of its own; a round is one step."""

        name: str = "ddp"

    inner_steps = 1

    def __init__(self, cfg: Config, group: WorkerGroup) -> None:
        self.name = cfg.name

    def inner_step(self, group: WorkerGroup, ctx: StepContext) -> None:
        """Replace every worker's gradient by the exchanged (averaged) one, then clip and step."""
        group.grads.copy_(ctx.exchange(group.grads).expand_as(group.grads))
        super().inner_step(group, ctx)
