"""The algorithm protocol: an inner-step hook, a local phase and an apply phase.

Each round the trainer runs the round's inner steps on every worker, calling
:meth:`Algorithm.inner_step` after each backward (the default clips and steps every worker's
inner optimizer; DDP first averages the gradients through the exchange; DeMo exchanges its
coefficients; Streaming DiLoCo merges fragments that came due), then
``payload = algorithm.payload(group)`` (the local phase: rows ``[K_local, P]`` or None),
``update = exchange(payload.rows, ...)`` (codec, collective, attack, validation, validator,
aggregation: ``[P]``), and ``algorithm.apply(group, update, pull)``. An algorithm never talks
to other workers itself: the exchange and the gather are injected, so the same code runs
simulated and distributed.

Why these hooks and no others: ``inner_step`` is the only per-step point where methods differ
(what happens to gradients and who steps); ``payload``/``apply`` are DESIGN's local and apply
phases around the exchange; ``state_dict`` makes the trainer's checkpoint whole. What a round
exchanges (its stream key, how many inner steps the exchange overlaps) travels with the
:class:`Payload`, not as state set on the algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from diloco.workers import WorkerGroup


class Exchange(Protocol):
    """Reduces payload rows ``[K_local, P]`` from every worker to one fp32 update ``[P]``.

    ``key`` names the payload stream (codec state such as error feedback is per stream).
    """

    def __call__(
        self,
        rows: torch.Tensor,
        key: str = "",
        weights: torch.Tensor | None = None,
        senders: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Exchange and aggregate ``rows`` (a weighted mean when ``weights`` are given)."""
        ...


Gather = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
"""All-gathers tensors ``[K_local, ...]`` into ``[K, ...]`` each, in global worker order, as
one collective (bytes counted)."""


@dataclass
class StepContext:
    """What one inner step may use: the exchange and gather, the lr multiplier, clipping.

    ``step`` counts the inner steps done once this one is (the trainer's reference step, or
    under ``sync=async`` the stepping worker's own count).
    """

    exchange: Exchange
    gather: Gather
    lr_mult: float
    grad_clip: float
    step: int
    any_active: bool = True  # some worker of the run (on any process) steps now


@dataclass
class Payload:
    """A round's local phase: rows to exchange on stream ``key``.

    ``overlap_steps``: inner steps the exchange runs behind (hidden in modelled time).
    """

    rows: torch.Tensor
    key: str = ""
    overlap_steps: int = 0


class Algorithm(Protocol):
    """What the trainer needs from a synchronisation algorithm.

    ``inner_steps`` is the length of a round; ``payload_kind`` says what the payload rows
    are (``"pseudo_gradient"``: whole-model pseudo-gradients, which the validator and the
    asynchronous schedule need; None: nothing exchanged at the round's end).
    """

    name: str
    inner_steps: int
    payload_kind: str | None

    def inner_step(self, group: WorkerGroup, ctx: StepContext) -> None:
        """After every backward: clip, sync gradients if the method does, step the workers."""
        ...

    def payload(self, group: WorkerGroup) -> Payload | None:
        """Local phase at the end of a round: the rows to exchange, or None."""
        ...

    def apply(
        self, group: WorkerGroup, update: torch.Tensor | None, pull: Sequence[int] | None = None
    ) -> None:
        """Apply phase: use the exchanged update; the workers in ``pull`` (None: all) resync."""
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
    payload_kind: str | None = None

    def inner_step(self, group: WorkerGroup, ctx: StepContext) -> None:
        """Clip each worker's gradient; every worker that ran steps its own inner optimizer."""
        group.clip_grads(ctx.grad_clip)
        if ctx.any_active:  # sets every local rate, steps the workers here that ran
            group.optimizer_step(ctx.lr_mult)

    def payload(self, group: WorkerGroup) -> Payload | None:
        """Nothing to exchange at the round end."""
        return None

    def apply(
        self, group: WorkerGroup, update: torch.Tensor | None, pull: Sequence[int] | None = None
    ) -> None:
        """Workers are kept equal, so the global model is worker 0's."""
        group.global_param.data.copy_(group.params[0])

    def state_dict(self) -> dict[str, Any]:
        """Stateless by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless by default."""
