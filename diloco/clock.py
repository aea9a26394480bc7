"""Modelled time: what a run would take on a given network, whatever machine simulates it.

Each round adds the slowest worker's compute (``steps * step_time / speed_i``, where the step
time is ``workers.step_time_s`` or the time measured here per worker, and ``speed_i`` comes
from the worker's profile: every sync waits for the slowest worker) and the network time of
every collective the round ran, with per-worker links of ``bandwidth * factor_i``
(:class:`diloco.comm.topology.NetworkModel`: the slowest link bounds each exchange, plus
latency per sequential step). An algorithm that overlaps its exchange with the next
``overlap_steps`` inner steps (Streaming DiLoCo) hides up to that much compute time.

Besides the configured bandwidth, ``comm.what_if_mbps`` lists bandwidths for which the same
run's modelled time is also kept (``time/sim_s@100mbps``), since the training itself does
not depend on the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diloco.comm.base import Collective
from diloco.comm.topology import NetworkModel
from diloco.profiles import Profiles


class SimClock:
    """Modelled compute plus communication time, for one or more bandwidths."""

    def __init__(
        self,
        bandwidth_mbps: float,
        latency_ms: float = 0.0,
        what_if_mbps: Sequence[float] = (),
        step_time_s: float | None = None,
        profiles: Profiles | None = None,
    ) -> None:
        self.step_time_s = step_time_s
        self.speeds = profiles.speeds if profiles else None
        factors = list(profiles.bandwidth_factors) if profiles else [1.0]

        def network(bw: float) -> NetworkModel:
            links = [bw * f for f in factors]
            return NetworkModel(links, links, latency_ms)

        self.k = len(factors)
        self.networks = {"": network(bandwidth_mbps)}
        for bw in what_if_mbps:
            self.networks[f"@{bw:g}mbps"] = network(bw)
        self.sim_s = dict.fromkeys(self.networks, 0.0)
        self.comm_s = dict.fromkeys(self.networks, 0.0)
        self._step_s = 0.0

    def compute(
        self,
        steps: Sequence[int],
        measured_s: float,
        speeds: Sequence[float] | None = None,
        measured_steps: int | None = None,
    ) -> None:
        """Add a round's compute: the longest ``steps_i / speed_i`` in reference steps.

        The reference step time is ``workers.step_time_s``, or the measured time per
        worker-step of this round (``measured_steps`` worker-steps took ``measured_s``;
        default: every worker's steps, as when all run in this process).
        """
        speeds = speeds or self.speeds or (1.0,) * len(steps)
        ran = [(n, v) for n, v in zip(steps, speeds, strict=True) if n]
        if not ran:
            return
        worker_steps = measured_steps or sum(n for n, _ in ran)
        per_step = self.step_time_s or measured_s / worker_steps
        compute_s = max(n / v for n, v in ran) * per_step
        self._step_s = compute_s / max(steps)
        for key in self.sim_s:
            self.sim_s[key] += compute_s

    def exchange(self, collectives: list[Collective], n: int, overlap_steps: int = 0) -> None:
        """Add the network time of a round's collectives (each ``nbytes`` over a topology)."""
        hidden = overlap_steps * self._step_s
        for key, network in self.networks.items():
            comm_s = sum(
                network.time(c.topology, n, c.nbytes) for c in collectives if c.topology is not None
            )
            self.comm_s[key] += comm_s
            self.sim_s[key] += max(0.0, comm_s - hidden)

    def push_pull(self, worker: int, up_bytes: float, down_bytes: float) -> float:
        """Seconds for ``worker`` to upload, then download, on its own link (async pushes)."""
        net = self.networks[""]
        up = torch.zeros(self.k, dtype=torch.float64)
        up[worker] = up_bytes
        down = torch.zeros_like(up)
        down[worker] = down_bytes
        zero = torch.zeros_like(up)
        return net.transfer_time(up, zero, 1) + net.transfer_time(zero, down, 1)

    def advance_to(self, sim_s: float, comm_s: float) -> None:
        """Set the modelled time to ``sim_s`` (events of async sync), adding ``comm_s``."""
        for key in self.sim_s:
            self.sim_s[key] = sim_s
            self.comm_s[key] += comm_s

    def metrics(self) -> dict[str, float]:
        """``time/sim_s``, ``time/comm_s`` and their what-if variants."""
        out = {f"time/sim_s{k}": v for k, v in self.sim_s.items()}
        out.update({f"time/comm_s{k}": v for k, v in self.comm_s.items()})
        return out

    def summary(self) -> dict[str, float]:
        """``sim_time_s``, ``comm_time_s`` and their what-if variants."""
        out = {f"sim_time_s{k}": v for k, v in self.sim_s.items()}
        out.update({f"comm_time_s{k}": v for k, v in self.comm_s.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        """Accumulated times."""
        return {"sim_s": dict(self.sim_s), "comm_s": dict(self.comm_s), "step_s": self._step_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.sim_s.update(state["sim_s"])
        self.comm_s.update(state["comm_s"])
        self._step_s = state["step_s"]
