"""DiLoCo: local inner steps, then an outer optimizer step on the averaged pseudo-gradient.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv 2311.08105. Every ``H`` inner steps:

    delta_i = theta_global - theta_i          (pseudo-gradient of worker i)
    theta_global.grad = mean_i delta_i        (or any robust aggregate)
    theta_global = OuterOpt.step()            (default Nesterov SGD, lr 0.7, momentum 0.9)
    theta_i = theta_global                    (inner optimizer state is kept)

Outer SGD with lr 1 and no momentum is FedAvg (McMahan et al. 2017); H=1 with inner SGD is
data-parallel SGD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diloco.algorithms.base import AlgorithmBase, Payload
from diloco.config import build_optimizer
from diloco.workers import WorkerGroup


def nesterov() -> dict[str, Any]:
    """DiLoCo's outer optimizer (Nesterov SGD, lr 0.7, momentum 0.9), as a ``_target_`` node."""
    return {"_target_": "torch.optim.SGD", "lr": 0.7, "momentum": 0.9, "nesterov": True}


class DiLoCo(AlgorithmBase):
    """DiLoCo with any ``torch.optim`` outer optimizer over the flat global parameters."""

    @dataclass
    class Config:
        """``inner_steps`` is H; ``outer_optimizer`` is a ``_target_`` node (partial)."""

        name: str = "diloco"
        inner_steps: int = field(default=50, metadata={"ge": 1})
        outer_optimizer: dict[str, Any] = field(default_factory=nesterov)

    payload_kind = "pseudo_gradient"

    def __init__(self, cfg: Config, group: WorkerGroup) -> None:
        self.name = cfg.name
        self.inner_steps = cfg.inner_steps
        self.outer = build_optimizer(cfg.outer_optimizer, "algorithm.outer_optimizer")(
            [group.global_param]
        )

    def payload(self, group: WorkerGroup) -> Payload:
        """Pseudo-gradients ``theta_pulled - theta_i``, one row per worker.

        ``theta_pulled`` is the global model every worker started the round from, or under
        the asynchronous schedule the one each worker pulled (:meth:`WorkerGroup.origins`).
        """
        return Payload(group.origins() - group.params)

    def apply(
        self, group: WorkerGroup, update: torch.Tensor | None, pull: Sequence[int] | None = None
    ) -> None:
        """Outer step with the aggregated pseudo-gradient as ``.grad``; workers pull the model."""
        assert update is not None
        assert group.global_param.grad is not None
        group.global_param.grad.copy_(update)
        self.outer.step()
        group.pull(pull)

    def state_dict(self) -> dict[str, Any]:
        """The outer optimizer's state (e.g. Nesterov momentum)."""
        return {"outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the outer optimizer's state."""
        self.outer.load_state_dict(state["outer"])
