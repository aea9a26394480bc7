"""The communicator protocol, its config, and the record of each collective run.

A communicator serves the ``K_local`` workers of one process. Payloads are row matrices
``[K_local, ...]`` in global worker order; results are in fp32. Every collective adds the bytes
each worker sends and receives to :attr:`Communicator.sent` / :attr:`Communicator.recv`
(cumulative, one entry per global worker), so bytes are counted the same way whether the
workers are simulated or real, and records a :class:`Collective` for the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from diloco.comm.topology import Topology


@dataclass
class CommConfig:
    """Topology and network of the run, payload bounds, and torch.distributed settings."""

    topology: Literal["ring", "butterfly", "parameter_server", "object_store"] = "ring"
    max_abs: float | None = field(default=1.0e6, metadata={"gt": 0.0})
    bandwidth_mbps: float = field(default=1000.0, metadata={"gt": 0.0})
    latency_ms: float = field(default=0.0, metadata={"ge": 0.0})
    what_if_mbps: list[float] = field(default_factory=list, metadata={"gt": 0.0})
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: NCCL on CUDA, else gloo
    timeout_s: float = field(default=300.0, metadata={"gt": 0.0})  # a collective's limit


@dataclass(frozen=True)
class Collective:
    """One exchange as the clock times it: ``nbytes`` per worker over ``topology``.

    A push (``topology`` None) is a parameter-server round trip of the ``senders`` only:
    each uploads ``nbytes`` and downloads ``pull_nbytes`` (the asynchronous schedule).
    """

    topology: Topology | None
    nbytes: float
    senders: tuple[int, ...] = ()
    pull_nbytes: float = 0.0


class Communicator(Protocol):
    """Collectives over the workers' payload rows, with byte accounting.

    ``local_ids`` are the global ids of the workers this process hosts (all of them in
    simulation); payload rows passed in are theirs, in that order.
    """

    cfg: CommConfig
    num_workers: int
    local_ids: list[int]
    rank: int
    world_size: int
    sent: torch.Tensor
    recv: torch.Tensor
    trusted: bool  # False: rows come from untrusted peers and may be missing
    received: torch.Tensor | None  # [K] rows that arrived in the last gather (None: all)
    rejected: dict[int, str]  # rows the transport excluded in the last gather, with reasons

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

    def push(
        self, parts: Sequence[torch.Tensor], senders: Sequence[int], nbytes: float, pull: float
    ) -> list[torch.Tensor]:
        """The ``senders``' rows sent to a server, which answers each with ``pull`` bytes."""
        ...

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over processes, for metrics (not counted)."""
        ...

    def barrier(self) -> None:
        """Wait for every process."""
        ...

    def shared_path(self, path: Path) -> Path:
        """The main process's ``path``, on every process (its run dir)."""
        ...

    def close(self) -> None:
        """Leave the process group, if any."""
        ...

    def metrics(self) -> dict[str, float]:
        """Transport metrics logged each round beyond the workers' bytes (e.g. intra-island)."""
        ...

    def summary(self) -> dict[str, Any]:
        """Summary fields this transport adds to, or sets in, ``summary.json``."""
        ...

    def drain(self) -> list[Collective]:
        """Collectives since the last call, for timing."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Byte counters, for checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore byte counters."""
        ...
