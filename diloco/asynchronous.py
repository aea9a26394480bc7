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

Simulation only (``comm=inprocess``), DiLoCo with mean aggregation: a robust aggregator or a
payload attack needs several payloads at once, and here they arrive one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from diloco import metrics as M
from diloco.algorithms import DiLoCo
from diloco.algorithms.streaming import StreamingDiLoCo
from diloco.config import Config, ConfigError

if TYPE_CHECKING:
    from diloco.trainer import Trainer

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


def check(cfg: Config, algorithm: object, world_size: int) -> None:
    """Reject what ``sync=async`` cannot run, with the key to change."""
    bad = [
        (not isinstance(algorithm, DiLoCo) or isinstance(algorithm, StreamingDiLoCo), "algorithm",
         "must be diloco, fedavg or sparseloco (one outer step per pseudo-gradient)"),
        (world_size > 1 or cfg.comm.backend != "inprocess", "comm", "must be inprocess"),
        (cfg.workers.step_time_s is None, "workers.step_time_s",
         "must be set: workers are scheduled by modelled time"),
        (cfg.aggregator["name"] != "mean", "aggregator", "must be mean (one payload at a time)"),
        (cfg.attack["name"] not in ("none", "poison"), "attack",
         "payload attacks need the other payloads in view: use attack=poison or none"),
        (cfg.validator.name != "none", "validator", "must be none"),
        (bool(cfg.faults.events or cfg.faults.rate), "faults", "must be none"),
        (bool(cfg.comm.what_if_mbps), "comm.what_if_mbps", "must be empty (the order of "
         "events depends on the bandwidth)"),
    ]  # fmt: skip
    for failed, key, msg in bad:
        if failed:
            raise ConfigError(key, f"{msg} with sync=async")


def fit_async(trainer: Trainer, logger: M.Logger) -> None:
    """Serve pushes in order of modelled arrival until ``train.steps`` reference steps pass."""
    t, cfg = trainer, trainer.cfg
    sched = t.schedule
    assert sched is not None and isinstance(t.algorithm, DiLoCo)
    end_s = cfg.train.steps * sched.step_s
    model_bytes = 4 * t.group.num_params
    while sched.finish[i := sched.next_worker()] <= end_s + 1e-9:
        ref = t.step  # reference steps of modelled time so far
        before = t.group.params[i].clone()
        stats = None
        for _ in range(sched.h):
            t.step = int(t.worker_steps[i])  # the worker's own step drives its lr schedule
            ran = t._inner_step([j == i for j in range(sched.k)])
            stats = stats if ran is None else ran
            t.worker_steps[i] += 1
        codec = t.exchange.stream(f"worker{i}")["codec"]  # error feedback per worker
        enc = codec.encode((before - t.group.params[i])[None])
        nbytes = enc.nbytes_per_worker()
        staleness, w = sched.weight(i)
        glob = t.group.global_param
        assert glob.grad is not None
        glob.grad.copy_(codec.decode(enc)[0] * w)
        t.algorithm.outer.step()
        t.group.params[i].copy_(glob.data)
        t.comm.sent[i] += nbytes
        t.comm.recv[i] += model_bytes
        comm_s = t.clock.push_pull(i, nbytes, model_bytes)
        now = sched.served(i, comm_s)
        t.clock.advance_to(now, comm_s)
        t.round += 1
        last = sched.finish[sched.next_worker()] > end_s + 1e-9
        t.step = cfg.train.steps if last else min(cfg.train.steps, math.floor(now / sched.step_s))
        t.step = max(t.step, ref)
        row = t._train_row(stats)
        row.update({STALENESS: float(staleness), WEIGHT: w})
        t._end_round(row, t.step - ref, logger, last)
