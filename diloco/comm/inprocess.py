"""All K workers in one process: collectives are tensor ops, bytes are counted as if sent."""

from __future__ import annotations

import torch

from diloco.comm.base import allgather_bytes, ring_allreduce_bytes
from diloco.comm.topology import RingAllGather, RingAllReduce, Topology


class InProcessComm:
    """Simulated communicator for ``num_workers`` workers that all live in this process.

    ``all_reduce_mean`` is accounted as a ring all-reduce and ``all_gather`` as a ring
    all-gather; the payload size is that of one worker's row as it is actually laid out
    (``numel * element_size`` of the encoded tensor).
    """

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.sent = torch.zeros(num_workers, dtype=torch.float64)
        self.recv = torch.zeros(num_workers, dtype=torch.float64)
        self.pending: list[tuple[Topology, float]] = []

    def _count(self, topology: Topology, nbytes: float, sent: float, recv: float) -> None:
        self.sent += sent
        self.recv += recv
        self.pending.append((topology, nbytes))

    def drain(self) -> list[tuple[Topology, float]]:
        """The collectives run since the last call, as ``(topology, bytes per worker)``."""
        done, self.pending = self.pending, []
        return done

    def all_reduce_mean(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """Mean of the rows, in fp32; each worker is charged a ring all-reduce of its row."""
        self._check(rows)
        nbytes = rows[0].numel() * rows.element_size() if nbytes is None else nbytes
        per_worker = ring_allreduce_bytes(self.num_workers, nbytes)
        self._count(RingAllReduce(), nbytes, per_worker, per_worker)
        return rows.float().mean(0)

    def all_gather(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """All rows; each worker is charged a ring all-gather of its row."""
        self._check(rows)
        nbytes = rows[0].numel() * rows.element_size() if nbytes is None else nbytes
        per_worker = allgather_bytes(self.num_workers, nbytes)
        self._count(RingAllGather(), nbytes, per_worker, per_worker)
        return rows

    def _check(self, rows: torch.Tensor) -> None:
        if rows.shape[0] != self.num_workers:
            raise ValueError(f"expected {self.num_workers} rows, got {tuple(rows.shape)}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Byte counters, for checkpoints."""
        return {"sent": self.sent.clone(), "recv": self.recv.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore byte counters."""
        self.sent.copy_(state["sent"])
        self.recv.copy_(state["recv"])
