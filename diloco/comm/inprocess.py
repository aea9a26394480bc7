"""All K workers in one process: collectives are tensor ops, bytes are counted as if sent."""

from __future__ import annotations

import torch

from diloco.comm.topology import (
    ButterflyAllReduce,
    ObjectStore,
    ParameterServer,
    RingAllGather,
    RingAllReduce,
    Topology,
)

# comm.topology -> (how a mean is reduced, how rows are gathered)
TOPOLOGIES: dict[str, tuple[Topology, Topology]] = {
    "ring": (RingAllReduce(), RingAllGather()),
    "butterfly": (ButterflyAllReduce(), RingAllGather()),
    "parameter_server": (ParameterServer(), ObjectStore()),
    "object_store": (ObjectStore(), ObjectStore()),
}


class InProcessComm:
    """Simulated communicator for ``num_workers`` workers that all live in this process.

    Bytes are charged per worker by the topology (``comm.topology``): a ring all-reduce
    (``2 (n-1)/n d`` each way) and ring all-gather (``(n-1) d``) by default; butterfly
    all-reduce; a parameter server (``d`` each way; a gather is relayed like an object store);
    or an object store (upload ``d`` once, download ``(n-1) d``). ``d`` is one worker's
    payload as it is actually laid out (``numel * element_size`` of the encoded tensors).
    """

    def __init__(self, num_workers: int, topology: str = "ring") -> None:
        self.num_workers = num_workers
        self.reduce_topology, self.gather_topology = TOPOLOGIES[topology]
        self.sent = torch.zeros(num_workers, dtype=torch.float64)
        self.recv = torch.zeros(num_workers, dtype=torch.float64)
        self.pending: list[tuple[Topology, float]] = []

    def _count(self, topology: Topology, nbytes: float) -> None:
        sent, recv = topology.bytes(self.num_workers, nbytes)
        self.sent += sent
        self.recv += recv
        self.pending.append((topology, nbytes))

    def drain(self) -> list[tuple[Topology, float]]:
        """The collectives run since the last call, as ``(topology, bytes per worker)``."""
        done, self.pending = self.pending, []
        return done

    def all_reduce_mean(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """Mean of the rows, in fp32; bytes charged by the reduce topology."""
        self._check(rows)
        nbytes = rows[0].numel() * rows.element_size() if nbytes is None else nbytes
        self._count(self.reduce_topology, nbytes)
        return rows.float().mean(0)

    def all_gather(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """All rows; bytes charged by the gather topology."""
        self._check(rows)
        nbytes = rows[0].numel() * rows.element_size() if nbytes is None else nbytes
        self._count(self.gather_topology, nbytes)
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
