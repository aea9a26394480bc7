"""The claims of the literature that the suite checks: arms, tuning grids and verdicts.

Each :class:`Claim` names its regime (``conf/experiment/claims/<regime>.yaml``), its arms
(a method as config overrides, at a model size) and the rule that turns the arms' final eval
losses into a verdict. An arm with a ``grid`` is tuned: every grid point runs once with
``TUNE_SEED`` and the point with the lowest final eval loss is then run with ``SEEDS``; an arm
with ``tune_from`` reuses that arm's chosen point (a codec or an attack changes nothing else).
Every tuned arm of the CPU suite gets the same budget: four grid points of the claim's full
run. Runs are identified by their resolved config, so an arm shared by several claims (DiLoCo
in the base regime) trains once.

Verdicts compare means over seeds; "beats" means the paired mean difference over the seeds
exceeds twice its standard error (and is then called significant), "matches" means within a
stated relative tolerance of the reference mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SEEDS = (0, 1, 2)
TUNE_SEED = 100  # tuning runs use a seed that no reported run uses

DEMO_LR = [1e-3, 2e-3, 4e-3, 8e-3]  # DeMo steps by the sign: rates like signSGD's
INNER_LR = [3e-3, 6e-3, 1.2e-2, 2.4e-2]
DILOCO_GRID = {"optimizer.lr": [3e-3, 1e-2], "algorithm.outer_optimizer.lr": [0.4, 0.8]}
OUTER_ADAM = [
    "algorithm.outer_optimizer._target_=torch.optim.Adam",
    "~algorithm.outer_optimizer.momentum",
    "~algorithm.outer_optimizer.nesterov",
]

SIZES = {
    "cpu": {
        "S": ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"],
        "M": ["model.n_layer=2", "model.n_embd=64", "model.n_head=2"],
    },
    "gpu": {
        "S": ["model.n_layer=4", "model.n_embd=256", "model.n_head=4"],
        "M": ["model.n_layer=8", "model.n_embd=512", "model.n_head=8"],
    },
    "debug": {
        "S": ["model.n_layer=1", "model.n_embd=16", "model.n_head=2"],
        "M": ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"],
    },
}
"""Model sizes per scale. ``cpu`` is the recorded suite; ``gpu`` the same suite at a larger
size and sequence length (``SCALES``); ``debug`` the end-to-end check that CI runs."""

SCALES = {
    "cpu": [],
    "gpu": ["device=cuda", "data.seq_len=256", "workers.precision=bf16"],
    "debug": [
        "train.steps=8",
        "train.eval_every=4",
        "train.log_every=2",
        "train.warmup_steps=2",
        "train.eval_sequences=8",
        "data.seq_len=16",
    ],
}
"""Overrides applied after every arm's own (``debug`` shrinks every run to 8 steps)."""


@dataclass(frozen=True)
class Arm:
    """One method of a claim: overrides on the claim's regime, a model size, tuning."""

    label: str
    overrides: tuple[str, ...] = ()
    size: str = "M"
    grid: dict[str, list[Any]] | None = None
    tune_from: str | None = None
    outer_lr_factor: float = 1.0  # times the chosen outer lr (the damped-honest check)


@dataclass
class Stats:
    """Final eval losses of one arm over the seeds, and what else the report shows."""

    losses: list[float]
    bytes_per_worker: float = 0.0
    peak_bytes: float = 0.0
    summaries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mean(self) -> float:
        """Mean final eval loss over the seeds."""
        return statistics.fmean(self.losses)

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds."""
        return statistics.stdev(self.losses) if len(self.losses) > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.mean:.4f} +- {self.std:.4f}"


def paired(a: Stats, b: Stats) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` over the seeds both have (same seeds, paired)."""
    diffs = [x - y for x, y in zip(a.losses, b.losses, strict=False)]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.inf
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def beats(a: Stats, b: Stats) -> str:
    """``yes``: ``a`` lower than ``b`` beyond 2 standard errors; ``no``: higher; else ``tie``."""
    mean, se = paired(a, b)
    if mean < -2 * se:
        return "yes"
    if mean > 2 * se:
        return "no"
    return "tie"


def gap(a: Stats, ref: Stats) -> float:
    """Relative gap of the means, ``a / ref - 1``."""
    return a.mean / ref.mean - 1


Verdict = tuple[str, str]
"""(verdict, one-line evidence): verdict is reproduced, partly, not reproduced or reversed."""


@dataclass
class Claim:
    """A published claim, the arms that test it and the rule that decides it."""

    name: str
    regime: str
    source: str
    statement: str
    criterion: str
    arms: list[Arm]
    decide: Callable[[dict[str, Stats]], Verdict]
    plot_arms: Sequence[str] = ()

    def tuned_by(self, arm: Arm) -> Arm:
        """The arm whose grid decides ``arm``'s point: itself, or its ``tune_from`` chain's end."""
        while arm.tune_from:
            arm = next(a for a in self.arms if a.label == arm.tune_from)
        return arm


def _beats_verdict(winner: str, losers: Sequence[str]) -> Callable[[dict[str, Stats]], Verdict]:
    def decide(s: dict[str, Stats]) -> Verdict:
        results = {lo: beats(s[winner], s[lo]) for lo in losers}
        parts = [
            f"{winner} - {lo} = {paired(s[winner], s[lo])[0]:+.4f} "
            f"(se {paired(s[winner], s[lo])[1]:.4f}, {r})"
            for lo, r in results.items()
        ]
        values = set(results.values())
        if values == {"yes"}:
            verdict = "reproduced"
        elif "no" in values and "yes" not in values:
            verdict = "reversed"
        elif "yes" in values:
            verdict = "partly"
        else:
            verdict = "not reproduced"
        return verdict, "; ".join(parts)

    return decide


def _ddp_gap(s: dict[str, Stats]) -> Verdict:
    small, large = gap(s["diloco_S"], s["ddp_S"]), gap(s["diloco_M"], s["ddp_M"])
    within, shrinks = large <= 0.03, large < small
    verdict = {(True, True): "reproduced", (False, False): "not reproduced"}.get(
        (within, shrinks), "partly"
    )
    return verdict, f"gap {small:+.1%} at S, {large:+.1%} at M"


def _h_forgiving(s: dict[str, Stats]) -> Verdict:
    ref = s["H=30"]
    gaps = {k: gap(v, ref) for k, v in s.items()}
    worst = max(abs(g) for g in gaps.values())
    verdict = "reproduced" if worst <= 0.05 else "partly" if worst <= 0.10 else "not reproduced"
    return verdict, ", ".join(f"{k} {g:+.1%}" for k, g in gaps.items()) + " vs H=30"


def _matches(ref: str, tol: float) -> Callable[[dict[str, Stats]], Verdict]:
    def decide(s: dict[str, Stats]) -> Verdict:
        gaps = {k: gap(v, s[ref]) for k, v in s.items() if k != ref}
        ok = [g <= tol for g in gaps.values()]
        verdict = "reproduced" if all(ok) else "partly" if any(ok) else "not reproduced"
        return verdict, ", ".join(f"{k} {g:+.2%} vs {ref}" for k, g in gaps.items())

    return decide


def _bytes_ratio(a: Stats, b: Stats) -> float:
    return b.bytes_per_worker / a.bytes_per_worker if a.bytes_per_worker else math.inf


def _streaming(s: dict[str, Stats]) -> Verdict:
    g = gap(s["streaming"], s["diloco"])
    same_bytes = abs(s["streaming"].bytes_per_worker / s["diloco"].bytes_per_worker - 1) < 0.01
    peak = s["diloco"].peak_bytes / s["streaming"].peak_bytes if s["streaming"].peak_bytes else 0
    ok = [g <= 0.01, same_bytes, peak >= 1.99]
    verdict = "reproduced" if all(ok) else "partly" if any(ok) else "not reproduced"
    return verdict, (
        f"gap {g:+.2%}, bytes equal: {same_bytes}, peak bytes per sync {peak:.2f}x lower"
    )


def _demo(s: dict[str, Stats]) -> Verdict:
    g, ratio = gap(s["demo"], s["ddp"]), _bytes_ratio(s["demo"], s["ddp"])
    ok = [g <= 0.03, ratio >= 20]
    verdict = "reproduced" if all(ok) else "partly" if any(ok) else "not reproduced"
    return verdict, f"gap {g:+.2%} vs DDP at {ratio:.1f}x fewer bytes"


def _sparseloco(s: dict[str, Stats]) -> Verdict:
    g, ratio = gap(s["sparseloco"], s["diloco"]), _bytes_ratio(s["sparseloco"], s["diloco"])
    verdict = "reproduced" if g <= 0.01 else "partly" if g <= 0.05 else "not reproduced"
    if g > 0.05 and beats(s["diloco"], s["sparseloco"]) == "yes":
        verdict = "reversed"
    return verdict, f"gap {g:+.2%} vs DiLoCo at {ratio:.0f}x fewer bytes"


def _replicas(s: dict[str, Stats]) -> Verdict:
    means = [s[k].mean for k in ("K=1", "K=4", "K=8", "K=16")]
    monotone = all(b < a for a, b in zip(means, means[1:], strict=False))
    verdict = "reproduced" if monotone else "partly" if means[-1] < means[0] else "reversed"
    return verdict, " > ".join(f"{m:.4f}" for m in means) + (
        " (monotone)" if monotone else " (not monotone)"
    )


def _robust(s: dict[str, Stats]) -> Verdict:
    honest, halved = s["honest"], s["honest, update halved"]
    tuned = beats(honest, halved) == "yes"
    hurt = {k: gap(v, honest) for k, v in s.items() if "honest" not in k}
    weak = [k for k in hurt if k.split(" / ")[1] in ("mean", "median", "krum")]
    strong = [k for k in hurt if k.split(" / ")[1] in ROBUST_RULES and k not in weak]
    degraded = sum(hurt[k] > 0.05 for k in weak)
    held = sum(hurt[k] <= 0.05 for k in strong)
    ok = [tuned, degraded == len(weak), held == len(strong)]
    verdict = "reproduced" if all(ok) else "partly" if any(ok) else "not reproduced"
    return verdict, (
        f"halving the honest update: {gap(halved, honest):+.2%} (tuned baseline: {tuned}); "
        f"{degraded}/{len(weak)} weak-rule runs >5% worse; "
        f"{held}/{len(strong)} robust-rule runs within 5%"
    )


def _grid_arm(label: str, overrides: Sequence[str] = (), size: str = "M") -> Arm:
    return Arm(label, tuple(overrides), size, dict(DILOCO_GRID))


DILOCO = _grid_arm("diloco")
NO_H = "~algorithm.inner_steps"  # DDP and DeMo sync every step: the regime's H does not apply
DDP = Arm("ddp", ("algorithm=ddp", NO_H), grid={"optimizer.lr": INNER_LR})

ROBUST_RULES = {
    "mean": "aggregator=mean",
    "median": "aggregator=median",
    "krum": "aggregator=krum",
    "bucketing+median": "aggregator=bucketing",
    # Karimireddy et al.'s own pairing; tau=1 is the scale of an honest pseudo-gradient here
    # (row norms 0.5-3.2 over the first 300 steps of the tuned honest run)
    "bucketing+cclip": "aggregator=bucketing "
    "aggregator.inner._target_=diloco.adversary.aggregators.CenteredClipping "
    "+aggregator.inner.tau=1.0",
    "nnm+trimmed_mean": "aggregator=nnm",
}


def _robust_arms() -> list[Arm]:
    arms = [
        _grid_arm("honest", ["attack.num_byzantine=0"], size="S"),
        Arm(
            "honest, update halved",
            ("attack.num_byzantine=0",),
            "S",
            tune_from="honest",
            outer_lr_factor=0.5,
        ),
    ]
    for attack in ("alie", "ipm"):
        for rule, override in ROBUST_RULES.items():
            arms.append(
                Arm(
                    f"{attack} / {rule}",
                    (f"attack={attack}", *override.split()),
                    "S",
                    tune_from="honest",
                )
            )
    arms.append(
        Arm("sign_flip / mean", ("attack=sign_flip", "aggregator=mean"), "S", tune_from="honest")
    )
    return arms


def _robustness(name: str, f_of_n: str) -> Claim:
    return Claim(
        name,
        name,
        "Karimireddy, He, Jaggi 2022 (arXiv 2012.10333), Table 2; Allouah et al. 2023 "
        "(arXiv 2302.01772), NNM",
        f"With a tuned honest baseline, ALIE and IPM at {f_of_n} degrade the mean, the "
        "coordinate median and Krum, while bucketing (with a median or centered clipping) or "
        "NNM before a robust rule stays within 5% of honest-only; sign flip under the mean "
        "hurts.",
        "reproduced if halving the honest outer step is worse (beyond 2 se), every ALIE/IPM "
        "run under mean/median/Krum is > 5% worse than honest and every one under "
        "bucketing/NNM within 5%",
        _robust_arms(),
        _robust,
    )


def _muloco(s: dict[str, Stats]) -> Verdict:
    better = beats(s["muon"], s["diloco"])
    g = gap(s["muon int4"], s["muon"])
    ok = [better == "yes", g <= 0.01]
    verdict = "reproduced" if all(ok) else "partly" if any(ok) else "not reproduced"
    if better == "no" and g > 0.01:
        verdict = "reversed"
    diff = paired(s["muon"], s["diloco"])[0]
    return verdict, f"muon - adamw: {diff:+.4f} ({better}); int4 {g:+.2%} vs muon fp32"


CLAIMS = [
    Claim(
        "ddp_gap",
        "ddp_gap",
        "DiLoCo scaling laws (Charles et al. 2025, arXiv 2503.09799), Fig. 2 and Table 4",
        "K=4 DiLoCo (H >= 30) is within a few percent of DDP at equal tokens, and the gap "
        "shrinks as the model grows.",
        "reproduced if the gap at the larger size is <= 3% and smaller than at the smaller size",
        [
            Arm("ddp_S", DDP.overrides, "S", DDP.grid),
            _grid_arm("diloco_S", size="S"),
            Arm("ddp_M", DDP.overrides, "M", DDP.grid),
            _grid_arm("diloco_M"),
        ],
        _ddp_gap,
    ),
    Claim(
        "outer_optimizer",
        "outer_optimizer",
        "DiLoCo (Douillard et al. 2023, arXiv 2311.08105), Fig. 4 (outer optimizers)",
        "Outer Nesterov momentum beats plain averaging (FedAvg: outer SGD, lr 1) and outer Adam.",
        "reproduced if Nesterov beats both beyond 2 standard errors of the paired difference",
        [
            DILOCO,
            Arm("fedavg", ("algorithm=fedavg",), grid={"optimizer.lr": INNER_LR}),
            Arm(
                "outer adam",
                tuple(OUTER_ADAM),
                grid={"optimizer.lr": [3e-3, 1e-2], "algorithm.outer_optimizer.lr": [0.01, 0.04]},
            ),
        ],
        _beats_verdict("diloco", ["fedavg", "outer adam"]),
    ),
    Claim(
        "h_forgiving",
        "h_forgiving",
        "DiLoCo (arXiv 2311.08105), Fig. 5 (communication frequency): H=1000 +2.9% over H=50",
        "The final loss changes by only a few percent between H=10 and H=200 at equal tokens.",
        "reproduced if every H in 10..200 ends within 5% of H=30 (partly: within 10%)",
        [
            _grid_arm("H=30"),
            Arm("H=10", ("algorithm.inner_steps=10",), tune_from="H=30"),
            Arm("H=100", ("algorithm.inner_steps=100",), tune_from="H=30"),
            Arm("H=200", ("algorithm.inner_steps=200",), tune_from="H=30"),
        ],
        _h_forgiving,
    ),
    Claim(
        "snoo",
        "snoo",
        "SNOO (arXiv 2510.15830), Fig. 1; DiLoCo scaling laws (arXiv 2503.09799), Sec. 5: M=1",
        "One worker with DiLoCo's outer Nesterov step beats plain AdamW at equal tokens.",
        "reproduced if DiLoCo M=1 beats AdamW beyond 2 standard errors",
        [
            _grid_arm("diloco M=1"),
            Arm("adamw", ("algorithm=ddp", NO_H), grid={"optimizer.lr": INNER_LR}),
        ],
        _beats_verdict("diloco M=1", ["adamw"]),
    ),
    Claim(
        "quantized",
        "quantized",
        "INTELLECT-1 (arXiv 2412.01152), Sec. 2.3 (int8 all-reduce); Streaming DiLoCo "
        "(arXiv 2501.18512), Fig. 8 (4-bit outer gradients)",
        "Pseudo-gradients quantized to int8 or 4 bits train as well as fp32.",
        "reproduced if int8 and int4 end within 1% of fp32 DiLoCo (same learning rates)",
        [
            _grid_arm("fp32"),
            Arm("int8", ("codec=int8",), tune_from="fp32"),
            Arm("int4", ("codec=int4",), tune_from="fp32"),
        ],
        _matches("fp32", 0.01),
    ),
    Claim(
        "streaming",
        "streaming",
        "Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512), Table 2 and Fig. 6",
        "Streaming DiLoCo matches DiLoCo at the same bytes with P times lower peak bandwidth.",
        "reproduced if within 1% of DiLoCo, with equal bytes and >= 2x lower peak bytes per sync",
        [DILOCO, _grid_arm("streaming", ["algorithm=streaming_diloco"])],
        _streaming,
    ),
    Claim(
        "demo",
        "demo",
        "DeMo (Peng et al. 2024, arXiv 2411.19870), Fig. 2 and Table 1",
        "DeMo matches AdamW-DDP at >= 20x fewer bytes.",
        "reproduced if within 3% of tuned DDP at >= 20x fewer bytes",
        [DDP, Arm("demo", ("algorithm=demo", NO_H), grid={"optimizer.lr": DEMO_LR})],
        _demo,
    ),
    Claim(
        "sparseloco",
        "sparseloco",
        "SparseLoCo (Sarfi et al. 2025, arXiv 2508.15706), Table 1",
        "SparseLoCo (1-3% density, 2-bit values) matches or beats DiLoCo.",
        "reproduced if within 1% of DiLoCo (partly: within 5%)",
        [
            DILOCO,
            Arm(
                "sparseloco",
                ("algorithm=sparseloco",),
                grid={"optimizer.lr": [3e-3, 1e-2], "algorithm.outer_optimizer.lr": [1.0, 2.0]},
            ),
        ],
        _sparseloco,
    ),
    _robustness("robustness", "f=2 of 8"),
    Claim(
        "replicas",
        "replicas",
        "DiLoCo (arXiv 2311.08105), Table 3 (number of replicas)",
        "More replicas at a fixed per-worker batch help, monotonically (1, 4, 8, 16).",
        "reproduced if the mean final loss falls strictly from K=1 to 4, 8 and 16",
        [
            Arm("K=1", ("workers.count=1",), "S", tune_from="K=4"),
            _grid_arm("K=4", size="S"),
            Arm("K=8", ("workers.count=8",), "S", tune_from="K=4"),
            Arm("K=16", ("workers.count=16",), "S", tune_from="K=4"),
        ],
        _replicas,
    ),
    Claim(
        "async_staleness",
        "async_staleness",
        "FedAsync (Xie et al. 2019, arXiv 1903.03934), Fig. 2 (staleness functions)",
        "Staleness-weighted asynchronous updates beat unweighted ones with a 4x straggler.",
        "reproduced if the weighted arm beats the unweighted one beyond 2 standard errors",
        [
            Arm(
                "weighted a=0.5", ("sync.staleness_exponent=0.5",), "S", {"optimizer.lr": INNER_LR}
            ),
            Arm("unweighted", ("sync.staleness_exponent=0.0",), "S", {"optimizer.lr": INNER_LR}),
        ],
        _beats_verdict("weighted a=0.5", ["unweighted"]),
    ),
    Claim(
        "muloco",
        "muloco",
        "MuLoCo (Thérien et al. 2025, arXiv 2505.23725), Table 1 and Fig. 3 (quantization)",
        "Muon as the inner optimizer beats AdamW-inner DiLoCo and tolerates low-bit "
        "pseudo-gradients.",
        "reproduced if Muon-DiLoCo beats AdamW-DiLoCo beyond 2 se and Muon with 4-bit "
        "pseudo-gradients ends within 1% of Muon fp32 (our lowest dense codec is 4-bit, the "
        "paper goes to 2)",
        [
            DILOCO,
            Arm("muon", ("optimizer=muon",), grid=dict(DILOCO_GRID)),
            Arm("muon int4", ("optimizer=muon", "codec=int4"), tune_from="muon"),
        ],
        _muloco,
    ),
    _robustness("robustness_16", "f=3 of 16"),
]


BY_NAME = {c.name: c for c in CLAIMS}
