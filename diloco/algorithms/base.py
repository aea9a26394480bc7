"""The algorithm protocol: a per-step gradient hook, a local phase and an apply phase.

Each round the trainer runs ``inner_steps`` inner steps on every worker, calling
:meth:`Algorithm.on_gradients` after each backward (DDP averages gradients there), then
``rows = algorithm.payload(group)`` (the local phase, ``[K_local, P]`` or ``None``),
``update = exchange(rows)`` (codec, attack, collective, validation, aggregation: ``[P]``), and
``algorithm.apply(group, update)``. An algorithm never talks to other workers itself: the
exchange is injected, so the same code runs simulated and distributed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from diloco.workers import WorkerGroup


class Exchange(Protocol):
    """Reduces payload rows ``[K_local, P]`` from every worker to one fp32 update ``[P]``.

    ``key`` names the payload stream (codec state such as error feedback is per stream).
    """

    def __call__(
        self, rows: torch.Tensor, key: str = "", weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exchange and aggregate ``rows`` (a weighted mean when ``weights`` are given)."""
        ...


Gather = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
"""All-gathers tensors ``[K_local, ...]`` into ``[K, ...]`` each, in global worker order, as
one collective (bytes counted)."""


class Algorithm(Protocol):
    """What the trainer needs from a synchronisation algorithm."""

    name: str
    inner_steps: int
    payload_key: str
    overlap_steps: int
    uses_exchange: bool

    def on_gradients(self, group: WorkerGroup, exchange: Exchange) -> None:
        """Called after every backward, before clipping and the inner optimizer step."""
        ...

    def step_optimizers(self, group: WorkerGroup, gather: Gather, lr_mult: float) -> None:
        """The inner optimizer step of every worker (DeMo exchanges its coefficients here)."""
        ...

    def after_step(self, group: WorkerGroup, step: int) -> None:
        """Called after every inner step (``step`` counts steps done), e.g. delayed merges."""
        ...

    def payload(self, group: WorkerGroup) -> torch.Tensor | None:
        """Local phase at the end of a round: the rows to exchange, or None."""
        ...

    def apply(self, group: WorkerGroup, update: torch.Tensor | None) -> None:
        """Apply phase: use the exchanged update; leave the global model current."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (e.g. outer optimizer)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


class AlgorithmBase:
    """Defaults for the hooks: local inner steps, nothing exchanged, worker 0 is the model."""

    name = "base"
    inner_steps = 1
    payload_key = ""  # names the payload stream of the round (per-stream codec state)
    overlap_steps = 0  # inner steps the round's exchange runs behind (hidden in modelled time)
    uses_exchange = True  # False: exchanges through its own gather (codec/attack do not apply)

    def on_gradients(self, group: WorkerGroup, exchange: Exchange) -> None:
        """No gradient exchange."""

    def step_optimizers(self, group: WorkerGroup, gather: Gather, lr_mult: float) -> None:
        """Every worker steps its own inner optimizer."""
        group.optimizer_step(lr_mult)

    def after_step(self, group: WorkerGroup, step: int) -> None:
        """Nothing to do between steps."""

    def payload(self, group: WorkerGroup) -> torch.Tensor | None:
        """Nothing to exchange at the round end."""
        return None

    def apply(self, group: WorkerGroup, update: torch.Tensor | None) -> None:
        """Workers are kept equal, so the global model is worker 0's."""
        group.global_param.data.copy_(group.params[0])

    def state_dict(self) -> dict[str, Any]:
        """Stateless by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless by default."""
