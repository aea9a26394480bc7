"""The planner: a DiLoCo-family run modelled at internet scale, without training.

::

    python -m diloco.plan model.params=10e9 workers.count=14 algorithm.inner_steps=100
        codec=int8 comm.bandwidth_mbps=500 workers.step_time_s=22.8 plan.gpus_per_worker=8

``conf/plan.yaml`` composes the training config's ``codec``, ``algorithm``, ``workers`` and
``comm`` groups, so every key means what it means to ``python -m diloco.train``. Each round is
timed by the simulator's own parts: :class:`diloco.clock.SimClock` (the slowest worker's
``steps * step_time / speed``, then each collective's network time, of which Streaming
DiLoCo hides ``tau`` steps), the topologies of :mod:`diloco.comm.topology` (ring all-reduce
when :func:`diloco.exchange.pipeline.all_reduces` says the exchange would, else the gather
topology: all-gather for sparse and 4-bit payloads), and the codec's own wire size at ``P``
entries (:func:`diloco.exchange.codec_base.wire_nbytes`). So a plan equals a run's
``sim_time_s``, ``comm_time_s`` and ``comm_bytes_per_worker`` for the same config
(``tests/test_plan.py``). Per round it prints compute ``steps * step_time``, communication,
the part hidden by overlap, and compute utilization ``compute / (compute + exposed comm)``;
then totals over ``train.steps`` at ``comm.bandwidth_mbps`` and every ``comm.what_if_mbps``.

Step time: ``workers.step_time_s`` (measured), else ``6 P tokens / (gpus * peak * mfu)`` with
``tokens = train.batch_size * data.seq_len`` per worker and step: 6 FLOPs per parameter and
token for forward and backward (Kaplan et al. 2020, arXiv 2001.08361); peak 989 TFLOPS, the
H100 SXM's dense bf16 (NVIDIA H100 datasheet); MFU 0.4, within the 36.2-41.4 % that
INTELLECT-1 reports on 8xH100 nodes (Jaghouar et al. 2024, arXiv 2412.01152).

:func:`check_published` sets up published runs (``experiments/claims/published_runs.yaml``:
INTELLECT-1, arXiv 2412.01152; Covenant-72B, Lidin et al. 2026, arXiv 2603.08163) and
compares the plan with what they report. Limits are the simulator's: ``sync=all`` without
faults, one bandwidth per worker for upload and download, no central-node bandwidth limit; and
the planner's own: Streaming DiLoCo fragments of equal size (the simulator's follow the
model's blocks; totals over whole cycles agree while every exchange outlasts its overlap),
DeMo not modelled (its payload depends on every tensor's shape).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf

from diloco.algorithms import DDP, DiLoCo
from diloco.algorithms.streaming import StreamingDiLoCo
from diloco.clock import SimClock
from diloco.comm.base import Collective, CommConfig
from diloco.comm.topology import TOPOLOGIES
from diloco.compose import compose
from diloco.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    WorkersConfig,
    from_dict,
    import_target,
)
from diloco.exchange.codec_base import wire_nbytes
from diloco.exchange.codecs import make_codec
from diloco.exchange.pipeline import all_reduces
from diloco.profiles import worker_profiles


@dataclass
class ModelSize:
    """Parameters exchanged (the model's count; ``10e9`` is read as an integer)."""

    params: float = field(default=1e9, metadata={"ge": 1.0})


@dataclass
class PlanSettings:
    """The FLOP model of a step (used when ``workers.step_time_s`` is null) and the output."""

    accelerator_tflops: float = field(default=989.0, metadata={"gt": 0.0})
    mfu: float = field(default=0.4, metadata={"gt": 0.0, "le": 1.0})
    gpus_per_worker: int = field(default=1, metadata={"ge": 1})
    format: Literal["text", "json"] = "text"


@dataclass
class PlanConfig:
    """``conf/plan.yaml``: the training config's groups and keys, plus ``model.params``."""

    seed: int = field(default=0, metadata={"ge": 0})
    model: ModelSize = field(default_factory=ModelSize)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    plan: PlanSettings = field(default_factory=PlanSettings)
    algorithm: dict[str, Any] = field(default_factory=dict)
    codec: dict[str, Any] = field(default_factory=dict)
    comm: dict[str, Any] = field(default_factory=dict)


@dataclass
class Round:
    """``count`` rounds alike: ``steps`` inner steps, then ``params`` entries exchanged.

    ``nbytes``: one worker's encoded payload; ``sent``: the bytes it sends in the collective;
    ``comm_s`` and ``sim_s`` per bandwidth key (``""``, ``"@100mbps"``, ...).
    """

    label: str
    count: int
    steps: int
    params: int
    nbytes: int
    sent: float
    compute_s: float
    comm_s: dict[str, float]
    sim_s: dict[str, float]


@dataclass
class Plan:
    """A modelled run: what is exchanged how, and its rounds."""

    algorithm: str
    codec: str
    collective: str
    workers: int
    params: int
    step_time_s: float
    step_time_source: str
    overlap_steps: int
    bandwidths_mbps: dict[str, float]
    rounds: list[Round]

    def totals(self, key: str = "") -> dict[str, float]:
        """Over ``train.steps`` at bandwidth ``key``: as a run's summary reports them."""
        compute = sum(r.count * r.compute_s for r in self.rounds)
        sim = sum(r.count * r.sim_s[key] for r in self.rounds)
        return {
            "rounds": sum(r.count for r in self.rounds),
            "compute_s": compute,
            "comm_s": sum(r.count * r.comm_s[key] for r in self.rounds),
            "sim_s": sim,
            "utilization": compute / sim if sim else 1.0,
            "bytes_per_worker": sum(r.count * r.sent for r in self.rounds),
        }

    def per_round(self, key: str = "") -> dict[str, float]:
        """Mean per round: ``compute_s``, ``comm_s``, ``round_s`` and ``utilization``."""
        t = self.totals(key)
        n = max(t["rounds"], 1)
        return {
            "compute_s": t["compute_s"] / n,
            "comm_s": t["comm_s"] / n,
            "round_s": t["sim_s"] / n,
            "utilization": t["utilization"],
        }

    def as_dict(self) -> dict[str, Any]:
        """Everything, with totals per bandwidth (``plan.format=json``)."""
        return {**asdict(self), "totals": {k: self.totals(k) for k in self.bandwidths_mbps}}

    def text(self) -> str:
        """The per-round table and the totals, for the console."""
        gb = 1e-9
        lines = [
            f"{self.algorithm}: {self.workers} workers, P = {self.params:,} parameters",
            f"step time {self.step_time_s:.3f} s ({self.step_time_source})",
            f"exchange: {self.codec}, {self.rounds[0].nbytes * gb:.3f} GB per worker, "
            f"{self.collective}; overlap {self.overlap_steps} steps",
            "",
            f"{'round':<12}{'count':>8}{'steps':>7}{'GB sent':>9}{'compute_s':>11}"
            f"{'comm_s':>10}{'hidden_s':>10}{'exposed_s':>11}{'util':>8}",
        ]
        for r in self.rounds:
            exposed = r.sim_s[""] - r.compute_s
            hidden = max(0.0, r.comm_s[""] - exposed)  # not -0.0 from rounding
            lines.append(
                f"{r.label:<12}{r.count:>8}{r.steps:>7}{r.sent * gb:>9.3f}{r.compute_s:>11.1f}"
                f"{r.comm_s['']:>10.1f}{hidden:>10.1f}{exposed:>11.1f}"
                f"{r.compute_s / r.sim_s['']:>8.1%}"
            )
        lines.append("")
        for key, mbps in self.bandwidths_mbps.items():
            t = self.totals(key)
            lines.append(
                f"total at {mbps:g} Mbps: {t['rounds']} rounds, compute {t['compute_s']:.1f} s, "
                f"comm {t['comm_s']:.1f} s, modelled {t['sim_s']:.1f} s "
                f"({t['sim_s'] / 3600:.2f} h), utilization {t['utilization']:.1%}"
            )
        return "\n".join(lines)


def compose_plan(overrides: Sequence[str]) -> dict[str, Any]:
    """``conf/plan.yaml`` with command-line ``overrides``, resolved to a plain dict."""
    node = compose(overrides, "plan")
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _schedule(node: dict[str, Any]) -> tuple[str, int, int, int]:
    """``(name, round length, fragments, overlap steps)`` of the algorithm, as it runs them."""
    cls = import_target(node, "algorithm")
    if not (isinstance(cls, type) and issubclass(cls, StreamingDiLoCo | DDP | DiLoCo)):
        raise ConfigError(
            f"algorithm={node.get('name', node['_target_'])}",
            "not modelled by the planner (diloco, fedavg, sparseloco, streaming_diloco, ddp are)",
        )
    cfg: Any = from_dict(cls.Config, node, "algorithm")
    if issubclass(cls, StreamingDiLoCo):
        return (cfg.name, *StreamingDiLoCo.schedule(cfg))
    return cfg.name, cls.inner_steps if issubclass(cls, DDP) else cfg.inner_steps, 1, 0


def build_plan(cfg: PlanConfig) -> Plan:
    """Model ``cfg``'s rounds with the simulator's clock, codec sizes and topologies."""
    k, p = cfg.workers.count, round(cfg.model.params)
    name, length, fragments, overlap = _schedule(cfg.algorithm)
    if fragments > p:
        raise ConfigError(f"algorithm.fragments={fragments}", f"more than model.params={p}")
    codec = make_codec(cfg.codec, feedback=False)  # the wire format; feedback adds no bytes
    net = from_dict(CommConfig, cfg.comm, "comm")
    reduce, gather = TOPOLOGIES[net.topology]
    topology = reduce if all_reduces(codec, plain=True) else gather
    profiles = worker_profiles(cfg.workers, cfg.seed)
    step_s, source = cfg.workers.step_time_s, "workers.step_time_s"
    if step_s is None:
        tokens = cfg.train.batch_size * cfg.data.seq_len
        s = cfg.plan
        step_s = 6 * p * tokens / (s.gpus_per_worker * s.accelerator_tflops * 1e12 * s.mfu)
        source = (
            f"FLOP model: 6 x P x {tokens:,} tokens / ({s.gpus_per_worker} x "
            f"{s.accelerator_tflops:g} TFLOPS x {s.mfu:g} MFU)"
        )

    def timed(label: str, count: int, steps: int, params: int) -> Round:
        clock = SimClock(net.bandwidth_mbps, net.latency_ms, net.what_if_mbps, step_s, profiles)
        clock.compute([steps] * k, 0.0)
        compute = clock.sim_s[""]
        nbytes = wire_nbytes(codec, params)
        clock.exchange([Collective(topology, nbytes)], k, overlap)
        sent = topology.bytes(k, nbytes)[0].mean().item()
        return Round(label, count, steps, params, nbytes, sent, compute, clock.comm_s, clock.sim_s)

    sizes = [p // fragments + (f < p % fragments) for f in range(fragments)]
    full, rest = divmod(cfg.train.steps, length)
    rounds = []
    for f, size in enumerate(sizes):
        count = full // fragments + (f < full % fragments)
        if count:
            rounds.append(timed(f"fragment {f}" if fragments > 1 else "round", count, length, size))
    if rest:
        rounds.append(timed("last", 1, rest, sizes[full % fragments]))
    what_if = {f"@{bw:g}mbps": bw for bw in net.what_if_mbps}
    return Plan(
        name, codec.name, f"{topology.name} over {k} workers", k, p, step_s, source, overlap,
        {"": net.bandwidth_mbps, **what_if}, rounds,
    )  # fmt: skip


def plan(overrides: Sequence[str]) -> Plan:
    """The plan of ``python -m diloco.plan *overrides``."""
    return build_plan(from_dict(PlanConfig, compose_plan(overrides)))


CRITERIA = {
    "utilization": ("within 10 points", lambda pred, rep: abs(pred - rep) <= 0.10),
    "round_s": ("within 20 %", lambda pred, rep: abs(pred / rep - 1.0) <= 0.20),
    "comm_s": ("within 20 %", lambda pred, rep: abs(pred / rep - 1.0) <= 0.20),
}
"""What each reported metric is held to: utilization within 10 points, times within 20 %."""


def check_published(path: str | Path) -> list[dict[str, Any]]:
    """Plan each published run of ``path`` and hold it to what the paper reports.

    ``path`` is a YAML file with ``runs:``, each with ``name``, ``source`` (citation and place
    in the paper), ``overrides`` (the run as planner overrides) and ``reported`` (per-round
    ``utilization``, ``round_s`` or ``comm_s``). One row per reported metric: name, source,
    metric, reported, predicted, criterion, holds.
    """
    rows = []
    for run in yaml.safe_load(Path(path).read_text())["runs"]:
        predicted = plan(run["overrides"]).per_round()
        for metric, reported in run["reported"].items():
            criterion, holds = CRITERIA[metric]
            rows.append({
                "name": run["name"], "source": run["source"], "metric": metric,
                "reported": float(reported), "predicted": predicted[metric],
                "criterion": criterion, "holds": bool(holds(predicted[metric], reported)),
            })  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: print the plan; a bad value is one line naming it, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = from_dict(PlanConfig, compose_plan(argv))
        result = build_plan(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result.text() if cfg.plan.format == "text" else json.dumps(result.as_dict(), indent=2))


if __name__ == "__main__":
    main()
