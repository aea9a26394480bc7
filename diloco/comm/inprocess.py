"""All K workers in one process: collectives are tensor ops, bytes are counted as if sent."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diloco.comm.base import Collective, CommConfig
from diloco.comm.topology import TOPOLOGIES, Topology
from diloco.config import ConfigError, configure


class InProcessComm:
    """Simulated communicator for ``num_workers`` workers that all live in this process.

    Bytes are charged per worker by the topology (``comm.topology``): a ring all-reduce
    (``2 (n-1)/n d`` each way) and ring all-gather (``(n-1) d``) by default; butterfly
    all-reduce; a parameter server (``d`` each way; a gather is relayed like an object store);
    or an object store (upload ``d`` once, download ``(n-1) d``). ``d`` is one worker's
    payload as it is actually laid out (``numel * element_size`` of the encoded tensors).

    :class:`diloco.comm.torchdist.TorchDistComm` subclasses this and replaces the tensor ops
    by real collectives; byte accounting is shared, so both count the same bytes.
    """

    Config = CommConfig
    rank = 0
    world_size = 1
    trusted = True  # every row arrives, intact: a plain mean may be an all-reduce
    received: torch.Tensor | None = None  # [K] rows that arrived in the last gather (None: all)

    def __init__(
        self,
        cfg: CommConfig | None = None,
        *,
        num_workers: int,
        device: Any = None,
        ranks_per_worker: int = 1,
        **kwargs: Any,
    ) -> None:
        if ranks_per_worker != 1 and type(self) is InProcessComm:
            raise ConfigError(
                f"workers.ranks_per_worker={ranks_per_worker}",
                "a worker spans several ranks only under comm=torchdist (torchrun)",
            )
        self.cfg = configure(type(self).Config, cfg, kwargs, "comm")
        self.num_workers = num_workers
        self.local_ids: list[int] = list(range(num_workers))
        self.reduce_topology, self.gather_topology = TOPOLOGIES[self.cfg.topology]
        self.sent = torch.zeros(num_workers, dtype=torch.float64)
        self.recv = torch.zeros(num_workers, dtype=torch.float64)
        self.pending: list[Collective] = []
        self.rejected: dict[int, str] = {}  # rows excluded by the transport (untrusted ones)

    def _count(self, topology: Topology, nbytes: float) -> None:
        sent, recv = topology.bytes(self.num_workers, nbytes)
        self.sent += sent
        self.recv += recv
        self.pending.append(Collective(topology, nbytes))

    def _nbytes(self, parts: Sequence[torch.Tensor], nbytes: float | None) -> float:
        for t in parts:
            if t.shape[0] != len(self.local_ids):
                raise ValueError(f"expected {len(self.local_ids)} rows, got {tuple(t.shape)}")
        if nbytes is not None:
            return nbytes
        return float(sum(t[0].numel() * t.element_size() for t in parts))

    def drain(self) -> list[Collective]:
        """The collectives run since the last call."""
        done, self.pending = self.pending, []
        return done

    def all_reduce_mean(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """Mean of every worker's row, in fp32; bytes charged by the reduce topology."""
        self._count(self.reduce_topology, self._nbytes([rows], nbytes))
        return self._sum_rows(rows.float()) / self.num_workers

    def _sum_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.sum(0)

    def all_gather(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """Every worker's row ``[K, ...]``; bytes charged by the gather topology."""
        return self.all_gather_parts([rows], nbytes)[0]

    def all_gather_parts(
        self, parts: Sequence[torch.Tensor], nbytes: float | None = None
    ) -> list[torch.Tensor]:
        """All-gather several ``[K_local, ...]`` tensors as one collective.

        E.g. an encoding's values, indices and scales; ``nbytes`` is one worker's share of all.
        """
        self._count(self.gather_topology, self._nbytes(parts, nbytes))
        return self._gather(list(parts))

    def _gather(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return parts

    def push(
        self, parts: Sequence[torch.Tensor], senders: Sequence[int], nbytes: float, pull: float
    ) -> list[torch.Tensor]:
        """The ``senders``' rows ``[len(senders), ...]`` to a server; each gets ``pull`` back.

        Bytes: every sender uploads ``nbytes`` and downloads ``pull`` (the new model).
        """
        ids = list(senders)
        self.sent[ids] += nbytes
        self.recv[ids] += pull
        self.pending.append(Collective(None, nbytes, tuple(ids), pull))
        return list(parts)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of ``values`` over processes, for metrics (not counted as traffic)."""
        return values

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in one process)."""

    def shared_path(self, path: Path) -> Path:
        """One process: its own path."""
        return path

    def close(self) -> None:
        """Nothing to leave."""

    def metrics(self) -> dict[str, float]:
        """Metrics of this transport beyond the workers' bytes (none here)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Summary fields of this transport, over those the trainer writes (none here)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Byte counters, for checkpoints."""
        return {"sent": self.sent.clone(), "recv": self.recv.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore byte counters."""
        self.sent.copy_(state["sent"])
        self.recv.copy_(state["recv"])


class PeerComm(InProcessComm):
    """One peer of a permissionless run per process (``comm=bucket``, ``comm=hivemind``).

    Hosts one worker, ``peer`` (-1: an observer that sends nothing, when ``observer``);
    ``sent`` / ``recv`` are this peer's bytes; ``round_of`` (set by the peer's trainer)
    numbers its exchanges; ``fingerprint`` is the run's shared config.
    """

    def __init__(
        self,
        cfg: CommConfig | None = None,
        *,
        num_workers: int,
        peer: int = 0,
        fingerprint: str = "",
        observer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(cfg, num_workers=num_workers, **kwargs)
        if not (-1 if observer else 0) <= peer < num_workers:
            raise ConfigError(f"worker.id={peer}", f"must be in [0, {num_workers})")
        self.peer = peer
        self.fingerprint = fingerprint  # the run's config: other runs' payloads are refused
        self.local_ids = [max(peer, 0)]
        self.sent = torch.zeros(1, dtype=torch.float64)  # this peer's bytes sent
        self.recv = torch.zeros(1, dtype=torch.float64)  # and received
        self.round_of: Callable[[], int] = lambda: 0
        self._calls: tuple[int, int] = (-1, 0)  # (round, exchanges so far in it)

    def _next_exchange(self) -> tuple[int, int]:
        """(round, index of this exchange in it): several per round (fragments)."""
        r = self.round_of()
        last, n = self._calls
        self._calls = (r, n + 1 if last == r else 0)
        return self._calls
