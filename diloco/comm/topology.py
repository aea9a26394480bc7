"""Who sends what to whom: per-worker bytes and modelled wall time of one exchange.

Each topology answers, for ``n`` workers that each contribute a payload of ``d`` bytes (the
encoded size, e.g. :func:`diloco.exchange.codecs.nbytes_per_worker`), how many bytes every worker
sends and receives in one exchange (``bytes(n, d) -> (sent[n], recv[n])``), how many
sequential message rounds it takes (``steps(n)``), and what a central node, if any, sends and
receives (``server_bytes(n, d)``). With equal shares every worker moves the same amount:

    topology          sent / worker   recv / worker   steps     central node (recv, sent)
    ring_allreduce    2 (n-1)/n d     2 (n-1)/n d     2 (n-1)   -
    butterfly         2 (n-1)/n d     2 (n-1)/n d     2         -
    ring_allgather    (n-1) d         (n-1) d         n - 1     -
    parameter_server  d               d               2         n d, n d
    object_store      d               (n-1) d         2         n d, n (n-1) d

:class:`NetworkModel` turns bytes into seconds with a bottleneck-link model (see there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diloco.config import ConfigError


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


def _full(n: int, value: float) -> Tensor:
    return torch.full((n,), float(value), dtype=torch.float64)


class Topology:
    """Base: per-worker bytes, sequential steps and central-node bytes of one exchange."""

    name = "topology"

    def bytes(self, n: int, d: float) -> tuple[Tensor, Tensor]:
        """Bytes each of ``n`` workers sends and receives (float64 ``[n]`` each)."""
        raise NotImplementedError

    def steps(self, n: int) -> int:
        """Sequential message rounds, each paying one network latency."""
        raise NotImplementedError

    def server_bytes(self, n: int, d: float) -> tuple[float, float]:
        """Bytes the central node (server, object store) sends and receives; 0 if none."""
        return 0.0, 0.0


class RingAllReduce(Topology):
    """Ring all-reduce (Patarasuk & Yuan 2009): reduce-scatter then all-gather.

    Each phase is ``n - 1`` steps in which every worker passes one ``d / n`` chunk to its
    successor: ``2 (n-1)/n d`` each way in ``2 (n-1)`` steps.
    """

    name = "ring_allreduce"

    def bytes(self, n: int, d: float) -> tuple[Tensor, Tensor]:
        """``2 (n-1)/n d`` each way."""
        b = _full(n, ring_allreduce_bytes(n, d))
        return b, b.clone()

    def steps(self, n: int) -> int:
        """``2 (n - 1)``."""
        return 2 * (n - 1)


class ButterflyAllReduce(Topology):
    """Butterfly all-reduce as in hivemind (Ryabinin et al.) and Bittensor subnet 38.

    The payload is cut into ``n`` parts; worker ``i`` owns a fraction ``f_i`` (default
    ``1/n``; hivemind sizes them by bandwidth, and ``f_i = 0`` is a client that owns nothing).
    Phase 1 (reduce-scatter): every worker sends each part directly to its owner, so worker
    ``i`` sends ``(1 - f_i) d`` and receives ``(n-1) f_i d``; the owner averages its part.
    Phase 2 (all-gather): every owner sends its averaged part to the ``n - 1`` others, so
    worker ``i`` sends ``(n-1) f_i d`` and receives ``(1 - f_i) d``. Per worker, both ways:
    ``(1 - f_i) d + (n-1) f_i d``, i.e. ``2 (n-1)/n d`` for equal parts (the ring's bytes)
    but in 2 steps instead of ``2 (n - 1)``. All transfers of a phase run concurrently.
    """

    name = "butterfly"

    def __init__(self, fractions: Sequence[float] | None = None) -> None:
        if fractions is not None and (
            not fractions or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9
        ):
            raise ConfigError("topology.fractions", f"got {fractions!r}; need >= 0, summing to 1")
        self.fractions = None if fractions is None else list(fractions)

    def bytes(self, n: int, d: float) -> tuple[Tensor, Tensor]:
        """``(1 - f_i) d + (n-1) f_i d`` each way."""
        if self.fractions is None:
            f = _full(n, 1.0 / n)
        elif len(self.fractions) == n:
            f = torch.tensor(self.fractions, dtype=torch.float64)
        else:
            raise ValueError(f"{len(self.fractions)} fractions for {n} workers")
        b = ((1.0 - f) + (n - 1) * f) * d if n > 1 else _full(n, 0.0)
        return b, b.clone()

    def steps(self, n: int) -> int:
        """2 (0 when alone)."""
        return 2 if n > 1 else 0


class RingAllGather(Topology):
    """Ring all-gather: ``n - 1`` steps, each forwarding one worker's ``d`` bytes."""

    name = "ring_allgather"

    def bytes(self, n: int, d: float) -> tuple[Tensor, Tensor]:
        """``(n-1) d`` each way."""
        b = _full(n, allgather_bytes(n, d))
        return b, b.clone()

    def steps(self, n: int) -> int:
        """``n - 1``."""
        return n - 1


class ParameterServer(Topology):
    """Workers push ``d`` to a server, which averages and sends ``d`` back to each.

    Two steps (push, pull); the server receives ``n d`` and sends ``n d``.
    """

    name = "parameter_server"

    def bytes(self, n: int, d: float) -> tuple[Tensor, Tensor]:
        """``d`` each way."""
        return _full(n, d), _full(n, d)

    def steps(self, n: int) -> int:
        """2: push, pull."""
        return 2

    def server_bytes(self, n: int, d: float) -> tuple[float, float]:
        """Sends ``n d``, receives ``n d``."""
        return float(n * d), float(n * d)


class ObjectStore(Topology):
    """Workers upload their payload once to a shared store, then download the others'.

    Templar-style exchange through buckets: each worker sends ``d`` and receives
    ``(n-1) d`` in two steps (upload, download); the store receives ``n d`` and serves
    ``n (n-1) d``.
    """

    name = "object_store"

    def bytes(self, n: int, d: float) -> tuple[Tensor, Tensor]:
        """``d`` up, ``(n-1) d`` down."""
        return _full(n, d), _full(n, (n - 1) * d)

    def steps(self, n: int) -> int:
        """2: upload, download."""
        return 2

    def server_bytes(self, n: int, d: float) -> tuple[float, float]:
        """Sends ``n (n-1) d``, receives ``n d``."""
        return float(n * (n - 1) * d), float(n * d)


TOPOLOGIES: dict[str, tuple[Topology, Topology]] = {
    "ring": (RingAllReduce(), RingAllGather()),
    "butterfly": (ButterflyAllReduce(), RingAllGather()),
    "parameter_server": (ParameterServer(), ObjectStore()),
    "object_store": (ObjectStore(), ObjectStore()),
}
"""``comm.topology`` -> (how a mean is reduced, how rows are gathered). A parameter server
relays a gather like an object store."""


def _rate(value: float | Sequence[float], n: int, key: str) -> Tensor:
    """Megabits per second (one or one per worker) -> bytes per second ``[n]``."""
    mbps = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if mbps.numel() == 1:
        mbps = mbps.expand(n)
    if mbps.numel() != n:
        raise ValueError(f"{key}: {mbps.numel()} values for {n} workers")
    if (mbps <= 0).any():
        raise ConfigError(key, "bandwidths must be > 0")
    return mbps * 1e6 / 8


class NetworkModel:
    """Wall time of one exchange from per-worker bytes: slowest link plus latency per step.

    With ``sent_i, recv_i`` from :meth:`Topology.bytes` and ``up_i, down_i`` in bytes/s
    (1 Mbps = 10**6 bit/s = 125 000 B/s)::

        time = max_i max(sent_i / up_i, recv_i / down_i, S_sent / S_up, S_recv / S_down)
               + latency * topology.steps(n)

    where ``S_*`` are the central node's bytes and bandwidths (``None`` = unlimited; peer-to-
    peer topologies have none). The bandwidth term assumes each link streams at its full rate
    for the whole exchange with phases pipelined, so the slowest link bounds the exchange
    (a lower bound for lock-step schedules on uneven links); each sequential step adds one
    one-way ``latency_ms``. Time is in seconds.
    """

    def __init__(
        self,
        upload_mbps: float | Sequence[float],
        download_mbps: float | Sequence[float],
        latency_ms: float = 0.0,
        server_upload_mbps: float | None = None,
        server_download_mbps: float | None = None,
    ) -> None:
        if latency_ms < 0:
            raise ConfigError(f"latency_ms={latency_ms}", "must be >= 0")
        self.upload_mbps, self.download_mbps = upload_mbps, download_mbps
        self.latency_ms = latency_ms
        self.server_upload_mbps, self.server_download_mbps = (
            server_upload_mbps,
            server_download_mbps,
        )

    def time(self, topology: Topology, n: int, nbytes: float) -> float:
        """Seconds for ``n`` workers to exchange ``nbytes`` each over ``topology``."""
        sent, recv = topology.bytes(n, nbytes)
        server = topology.server_bytes(n, nbytes)
        return self.transfer_time(sent, recv, topology.steps(n), server)

    def transfer_time(
        self,
        sent: Tensor,
        recv: Tensor,
        steps: int,
        server: tuple[float, float] = (0.0, 0.0),
    ) -> float:
        """Seconds for given per-worker bytes, step count and central-node ``(sent, recv)``."""
        n = sent.numel()
        up = _rate(self.upload_mbps, n, "upload_mbps")
        down = _rate(self.download_mbps, n, "download_mbps")
        worst = [(sent / up).max().item() if n else 0.0, (recv / down).max().item() if n else 0.0]
        for nb, mbps, key in (
            (server[0], self.server_upload_mbps, "server_upload_mbps"),
            (server[1], self.server_download_mbps, "server_download_mbps"),
        ):
            if mbps is not None:
                worst.append(nb / _rate(mbps, 1, key).item())
        return max(worst) + steps * self.latency_ms / 1000.0
