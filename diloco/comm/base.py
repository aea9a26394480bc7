"""The communicator protocol and the textbook byte counts of its collectives.

A communicator serves the ``K_local`` workers of one process. Payloads are row matrices
``[K_local, ...]`` in global worker order; results are in fp32. Every collective adds the bytes
each worker sends and receives to :attr:`Communicator.sent` / :attr:`Communicator.recv`
(cumulative, one entry per global worker), so bytes are counted the same way whether the
workers are simulated or real.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from diloco.comm.topology import Topology


def ring_allreduce_bytes(n: int, nbytes: float) -> float:
    """Bytes each of ``n`` workers sends (and receives) in a ring all-reduce of ``nbytes``.

    Reduce-scatter then all-gather, each ``n - 1`` steps of ``nbytes / n``: ``2 (n-1)/n d``.
    """
    return 2.0 * (n - 1) / n * nbytes if n > 1 else 0.0


def allgather_bytes(n: int, nbytes: float) -> float:
    """Bytes each of ``n`` workers receives in an all-gather of ``nbytes`` per worker: ``(n-1) d``.

    In a ring all-gather each worker also forwards ``(n-1) d`` bytes, so sent equals received.
    """
    return float(n - 1) * nbytes


class Communicator(Protocol):
    """Collectives over the workers' payload rows, with byte accounting.

    ``local_ids`` are the global ids of the workers this process hosts (all of them in
    simulation); payload rows passed in are theirs, in that order.
    """

    num_workers: int
    local_ids: list[int]
    rank: int
    world_size: int
    sent: torch.Tensor
    recv: torch.Tensor

    def all_reduce_mean(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """Mean over all workers of ``rows`` ``[K_local, ...]`` -> ``[...]``.

        ``nbytes`` is one worker's payload as sent (e.g. encoded); default: the row's size.
        """
        ...

    def all_gather(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """Every worker's row, ``[K_local, ...]`` -> ``[K, ...]`` in global worker order."""
        ...

    def all_gather_parts(
        self, parts: Sequence[torch.Tensor], nbytes: float | None = None
    ) -> list[torch.Tensor]:
        """Several ``[K_local, ...]`` tensors gathered as one collective -> ``[K, ...]`` each."""
        ...

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over processes, for metrics (not counted)."""
        ...

    def barrier(self) -> None:
        """Wait for every process."""
        ...

    def drain(self) -> list[tuple[Topology, float]]:
        """Collectives since the last call as ``(topology, bytes per worker)``, for timing."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Byte counters, for checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore byte counters."""
        ...
