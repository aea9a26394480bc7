"""Topologies: per-worker bytes equal the textbook formulas; modelled time by hand."""

from __future__ import annotations

import pytest
import torch

from diloco.comm.topology import (
    TOPOLOGIES,
    ButterflyAllReduce,
    NetworkModel,
    ObjectStore,
    ParameterServer,
    RingAllGather,
    RingAllReduce,
)
from diloco.config import ConfigError
from tests.helpers import make_config

D = 1000.0


def textbook(name, n, d):
    """(sent, recv, steps, server (sent, recv)) per worker."""
    return {
        "ring_allreduce": (2 * (n - 1) / n * d, 2 * (n - 1) / n * d, 2 * (n - 1), (0, 0)),
        "butterfly": (2 * (n - 1) / n * d, 2 * (n - 1) / n * d, 2 if n > 1 else 0, (0, 0)),
        "ring_allgather": ((n - 1) * d, (n - 1) * d, n - 1, (0, 0)),
        "parameter_server": (d, d, 2, (n * d, n * d)),
        "object_store": (d, (n - 1) * d, 2, (n * (n - 1) * d, n * d)),
    }[name]


ALL = [RingAllReduce(), ButterflyAllReduce(), RingAllGather(), ParameterServer(), ObjectStore()]


@pytest.mark.parametrize("topo", ALL, ids=[t.name for t in ALL])
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_bytes_match_textbook(topo, n):
    name = topo.name
    sent, recv = topo.bytes(n, D)
    want_sent, want_recv, steps, server = textbook(name, n, D)
    assert sent.shape == recv.shape == (n,)
    torch.testing.assert_close(sent, torch.full((n,), want_sent, dtype=torch.float64))
    torch.testing.assert_close(recv, torch.full((n,), want_recv, dtype=torch.float64))
    assert topo.steps(n) == steps
    assert topo.server_bytes(n, D) == pytest.approx(server)


def test_every_byte_sent_is_received():
    for n in (2, 4, 7):
        for topo in (RingAllReduce(), ButterflyAllReduce(), RingAllGather()):
            sent, recv = topo.bytes(n, D)
            assert sent.sum().item() == pytest.approx(recv.sum().item())
        for topo in (ParameterServer(), ObjectStore()):
            sent, recv = topo.bytes(n, D)
            s_sent, s_recv = topo.server_bytes(n, D)
            assert sent.sum().item() == pytest.approx(s_recv)
            assert recv.sum().item() == pytest.approx(s_sent)


def test_butterfly_uneven_parts():
    # worker 0 owns half, worker 1 nothing (a client), workers 2, 3 a quarter each
    f = [0.5, 0.0, 0.25, 0.25]
    sent, recv = ButterflyAllReduce(f).bytes(4, D)
    # (1 - f) d out in reduce-scatter + 3 f d out in all-gather (and the mirror inbound)
    want = torch.tensor([500 + 1500, 1000 + 0, 750 + 750, 750 + 750], dtype=torch.float64)
    torch.testing.assert_close(sent, want)
    torch.testing.assert_close(recv, want)
    with pytest.raises(ConfigError):
        ButterflyAllReduce([0.7, 0.7])
    with pytest.raises(ValueError):
        ButterflyAllReduce(f).bytes(3, D)


def test_network_time_heterogeneous_ring_by_hand():
    # n = 3, d = 3 MB: ring moves 2 * 2/3 * 3e6 = 4e6 B = 32 Mbit each way per worker.
    net = NetworkModel(upload_mbps=[8, 16, 80], download_mbps=[80, 4, 80], latency_ms=10)
    # uploads: 32/8 = 4 s, 32/16 = 2 s, 0.4 s; downloads: 0.4 s, 32/4 = 8 s, 0.4 s
    # slowest link: 8 s; latency: 2 (n - 1) = 4 steps * 10 ms
    assert net.time(RingAllReduce(), 3, 3e6) == pytest.approx(8.0 + 0.04)
    # butterfly: same bytes, 2 steps
    assert net.time(ButterflyAllReduce(), 3, 3e6) == pytest.approx(8.0 + 0.02)
    # all-gather: 2 * 3e6 B = 48 Mbit each way; worst 48/4 = 12 s; 2 steps
    assert net.time(RingAllGather(), 3, 3e6) == pytest.approx(12.0 + 0.02)


def test_network_time_server_and_store_by_hand():
    net = NetworkModel(
        upload_mbps=[8, 16, 80],
        download_mbps=[80, 4, 80],
        latency_ms=10,
        server_upload_mbps=100,
        server_download_mbps=40,
    )
    # PS, d = 1 MB = 8 Mbit: worker 0 up 8/8 = 1 s, worker 1 down 8/4 = 2 s;
    # server receives 3 MB = 24 Mbit at 40 -> 0.6 s, sends 24 Mbit at 100 -> 0.24 s
    assert net.time(ParameterServer(), 3, 1e6) == pytest.approx(2.0 + 0.02)
    # object store: worker 1 downloads 2 MB = 16 Mbit at 4 -> 4 s; store serves 48 Mbit -> 0.48 s
    assert net.time(ObjectStore(), 3, 1e6) == pytest.approx(4.0 + 0.02)
    slow = NetworkModel(1000, 1000, latency_ms=0, server_download_mbps=1)
    # the server is the bottleneck: 7 workers * 1 MB = 56 Mbit at 1 Mbps
    assert slow.time(ParameterServer(), 7, 1e6) == pytest.approx(56.0)


def test_network_model_scalars_and_single_worker():
    net = NetworkModel(upload_mbps=100, download_mbps=200, latency_ms=5)
    # ring, n = 4, d = 4e6 B: 6e6 B = 48 Mbit each way; up 0.48 s, down 0.24 s; 6 steps
    assert net.time(RingAllReduce(), 4, 4e6) == pytest.approx(0.48 + 0.03)
    assert net.time(RingAllReduce(), 1, 4e6) == 0.0
    with pytest.raises(ValueError):
        NetworkModel([1, 2], 1).time(RingAllReduce(), 3, D)
    with pytest.raises(ConfigError):
        NetworkModel(0, 1).time(RingAllReduce(), 2, D)


def test_comm_topology_choices():
    # comm.topology names how a mean is reduced and how rows are gathered
    assert {k: (r.name, g.name) for k, (r, g) in TOPOLOGIES.items()} == {
        "ring": ("ring_allreduce", "ring_allgather"),
        "butterfly": ("butterfly", "ring_allgather"),
        "parameter_server": ("parameter_server", "object_store"),
        "object_store": ("object_store", "object_store"),
    }


def test_unknown_topology():
    with pytest.raises(ConfigError, match="comm.topology"):
        make_config("comm.topology=mesh")
