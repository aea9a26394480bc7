"""Asynchronous DiLoCo (``sync=async``): a worker syncs when it finishes; stale updates weigh less.

Each worker repeatedly pulls the global model, runs H inner steps at its own speed, and pushes
its pseudo-gradient ``delta_i = theta_pulled - theta_i``; the server applies an outer step at
once, with no waiting for the others:

    s = outer updates applied since worker i pulled             (staleness)
    w = min(1, (K / (1 + s)) ** a) / K                           (staleness-aware weight)
    theta.grad = w * delta_i;  OuterOpt.step();  worker i pulls theta

``w`` is FedAsync's polynomial rule ``(1 + s) ** -a`` (Xie, Koyejo, Gupta, "Asynchronous
Federated Optimization", arXiv 1903.03934) normalised to K workers: an update as fresh as in a
synchronous round (``s <= K - 1``: K workers take turns) counts ``1 / K``, so K on-time
updates make one averaged round; staler ones count less. Liu et al., "Asynchronous Local-SGD
Training for Language Modeling" (arXiv 2401.09135), study this setting for DiLoCo.

Modelled time orders the events. Worker i's compute takes ``H * step_time / speed_i``; its
push (the encoded payload) and pull (the fp32 model) at its link bandwidth, plus latency,
delay its next cycle. Equal finish times are served in worker-id order. The run lasts
``train.steps`` reference steps of modelled time, so fast workers run more steps than slow ones.

In the trainer's one round loop a round is one push: :class:`Async` plans it (worker i runs
H steps from its own step count, which drives its lr schedule), the exchange sends worker i's
payload alone (:meth:`diloco.comm.InProcessComm.push`: its upload, and the download of the
new model), ``Algorithm.apply`` takes the outer step with the update scaled by ``w`` and worker
i pulls the model. Each worker's pseudo-gradient is taken from the model it pulled
(:meth:`diloco.workers.WorkerGroup.track_origins`).

Simulation only (``comm=inprocess``), DiLoCo with mean aggregation: a robust aggregator or a
payload attack needs several payloads at once, and here they arrive one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from diloco.comm.inprocess import InProcessComm
from diloco.config import ConfigError
from diloco.faults import RoundFaults
from diloco.profiles import Profiles
from diloco.sync import Progress, RoundEnd, RoundPlan

STALENESS = "sync/staleness"
WEIGHT = "sync/weight"


class AsyncSchedule:
    """Which worker's push the server handles next, and the weight of its update.

    Args:
        h: inner steps per cycle.
        step_s: the reference worker's seconds per inner step.
        speeds: relative compute speed of each worker.
        exponent: ``a`` in the staleness weight.
    """

    def __init__(self, h: int, step_s: float, speeds: Sequence[float], exponent: float) -> None:
        self.h, self.step_s, self.speeds, self.exponent = h, step_s, list(speeds), exponent
        self.k = len(self.speeds)
        self.finish = [self.cycle_s(i) for i in range(self.k)]  # when each push arrives
        self.pulled = [0] * self.k  # the model version each worker started from
        self.version = 0

    def cycle_s(self, i: int) -> float:
        """Seconds of compute in one cycle of worker ``i``."""
        return self.h * self.step_s / self.speeds[i]

    def next_worker(self) -> int:
        """The worker whose push arrives first (lowest id on ties)."""
        return min(range(self.k), key=lambda i: (self.finish[i], i))

    def weight(self, i: int) -> tuple[int, float]:
        """Staleness ``s`` of worker ``i``'s push and its weight ``min(1, (K/(1+s))^a) / K``."""
        s = self.version - self.pulled[i]
        return s, min(1.0, (self.k / (1 + s)) ** self.exponent) / self.k

    def served(self, i: int, comm_s: float) -> float:
        """Record that worker ``i``'s push was applied; returns the time it was applied."""
        t = self.finish[i]
        self.version += 1
        self.pulled[i] = self.version
        self.finish[i] = t + comm_s + self.cycle_s(i)
        return t

    def state_dict(self) -> dict[str, Any]:
        """Arrival times, pulled versions and the model version."""
        return {"finish": list(self.finish), "pulled": list(self.pulled), "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.finish, self.pulled = list(state["finish"]), list(state["pulled"])
        self.version = state["version"]


class Async:
    """The ``sync=async`` policy: each round serves the push that arrives first."""

    @dataclass
    class Config:
        """``staleness_exponent``: ``a`` in the weight ``min(1, (K / (1 + s))^a) / K``."""

        staleness_exponent: float = field(default=0.5, metadata={"ge": 0.0})

    def __init__(
        self,
        cfg: Config,
        *,
        inner_steps: int,
        profiles: Profiles,
        step_time_s: float | None,
        **_: Any,
    ) -> None:
        self.cfg, self.h, self.speeds = cfg, inner_steps, profiles.speeds
        self.schedule = AsyncSchedule(
            inner_steps, step_time_s or 1.0, profiles.speeds, cfg.staleness_exponent
        )

    def setup(self, parts: Any) -> None:
        """Reject what ``sync=async`` cannot run, with the key to change; track origins.

        Workers pull the model at different times, so each one's pseudo-gradient is taken
        from the model it pulled (:meth:`diloco.workers.WorkerGroup.track_origins`).
        """
        cfg, algorithm, comm, exchange = parts.cfg, parts.algorithm, parts.comm, parts.exchange
        bad = [
            (getattr(algorithm, "payload_kind", None) != "pseudo_gradient", "algorithm",
             "must be diloco, fedavg or sparseloco (one outer step per pseudo-gradient)"),
            (comm.world_size > 1 or type(comm) is not InProcessComm, "comm", "must be inprocess"),
            (cfg.workers.step_time_s is None, "workers.step_time_s",
             "must be set: workers are scheduled by modelled time"),
            (not exchange.plain_mean, "aggregator", "must be mean (one payload at a time)"),
            (exchange.attack_forges, "attack",
             "payload attacks need the other payloads in view: use attack=poison or none"),
            (exchange.validator is not None, "validator", "must be none"),
            (bool(cfg.faults.events or cfg.faults.rate), "faults", "must be none"),
            (bool(comm.cfg.what_if_mbps), "comm.what_if_mbps", "must be empty (the order of "
             "events depends on the bandwidth)"),
        ]  # fmt: skip
        for failed, key, msg in bad:
            if failed:
                raise ConfigError(key, f"{msg} with sync=async")
        parts.group.track_origins()

    def plan(self, progress: Progress, faults: RoundFaults) -> RoundPlan | None:
        """Worker ``i``, whose push arrives next, runs H steps from its own step count."""
        sched = self.schedule
        i = sched.next_worker()
        if sched.finish[i] > self._end(progress) + 1e-9:
            return None
        staleness, w = sched.weight(i)
        steps = [self.h if j == i else 0 for j in range(sched.k)]
        first = int(progress.worker_steps[i])  # the worker's own step drives its lr schedule
        metrics = {STALENESS: float(staleness), WEIGHT: w}
        return RoundPlan(steps, self.h, first, list(self.speeds), None, [i], w, False, metrics)

    def _end(self, progress: Progress) -> float:
        return progress.total_steps * self.schedule.step_s

    def finish(self, plan: RoundPlan, end: RoundEnd) -> tuple[int, bool]:
        """The push and pull delay the worker's next cycle; modelled time jumps to the push."""
        sched = self.schedule
        [push] = end.comm.drain()
        i = push.senders[0]
        comm_s = end.clock.push_pull(i, push.nbytes, push.pull_nbytes)
        now = sched.served(i, comm_s)
        end.clock.advance_to(now, comm_s)
        last = sched.finish[sched.next_worker()] > self._end(end.progress) + 1e-9
        total = end.progress.total_steps
        step = total if last else min(total, math.floor(now / sched.step_s))
        return max(step, end.progress.step), last

    def state_dict(self) -> dict[str, Any]:
        """The schedule."""
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule."""
        self.schedule.load_state_dict(state)
