"""Who competes in a model competition: miner specs, sampled miners, copiers, their configs.

:mod:`diloco.compete` runs the competition; each training miner is a run of ``diloco.train``
composed from ``base``, its seed and its own overrides (``conf/compete.yaml``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from omegaconf import OmegaConf

from diloco.competition import DetectConfig, RewardConfig
from diloco.compose import compose
from diloco.config import Config, ConfigError, LoggerConfig, parse
from diloco.data import Corpus


@dataclass
class MinerSpec:
    """One miner: its overrides of the base run and the share of the training split it sees."""

    name: str | None = None
    overrides: list[str] = field(default_factory=list)
    data_fraction: float = field(default=1.0, metadata={"gt": 0.0, "le": 1.0})


@dataclass
class Dimension:
    """One key of a sampled miner: drawn from ``choices``, or from ``[low, high]`` (``log``)."""

    key: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False


@dataclass
class SampleConfig:
    """``count`` more miners, each drawing every key of ``space`` (seeded)."""

    count: int = field(default=0, metadata={"ge": 0})
    space: list[Dimension] = field(default_factory=list)


@dataclass
class CopierConfig:
    """A miner that re-submits the last leader's weights instead of training."""

    name: str = "copier"
    mode: Literal["exact", "noise", "finetune"] = "exact"
    noise: float = field(default=1e-3, metadata={"ge": 0.0})  # std relative to the weights' rms
    steps: int = field(default=5, metadata={"ge": 1})  # finetune: its own steps on the copy
    lr: float = field(default=1e-4, metadata={"gt": 0.0})


@dataclass
class CompeteConfig:
    """A whole competition (``conf/compete.yaml``)."""

    seed: int = field(default=0, metadata={"ge": 0})
    resume: bool = False
    epochs: int = field(default=4, metadata={"ge": 1})
    steps_per_epoch: int = field(default=50, metadata={"ge": 1})
    eval_batches: int = field(default=8, metadata={"ge": 1})  # fresh held-out batches per epoch
    eval_batch_size: int = field(default=16, metadata={"ge": 1})
    flops_per_s: float = field(default=1e12, metadata={"gt": 0.0})  # a miner's modelled compute
    bandwidth_mbps: float = field(default=100.0, metadata={"gt": 0.0})  # submission upload
    base: list[str] = field(default_factory=list)
    miners: list[MinerSpec] = field(default_factory=list)
    sample: SampleConfig = field(default_factory=SampleConfig)
    copiers: list[CopierConfig] = field(default_factory=list)
    reward: RewardConfig = field(default_factory=RewardConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def sampled(spec: SampleConfig, seed: int) -> list[MinerSpec]:
    """The miners drawn from ``spec.space`` (seeded), as override lists."""
    for j, d in enumerate(spec.space):
        ranged = d.low is not None and d.high is not None
        if (d.choices is None) == (not ranged) or d.choices == []:
            raise ConfigError(f"sample.space[{j}]", f"{d.key}: give choices, or low and high")
        if ranged and not (0 < d.low <= d.high if d.log else d.low <= d.high):  # type: ignore[operator]
            raise ConfigError(f"sample.space[{j}]", f"{d.key}: need low <= high (> 0 with log)")
    gen = torch.Generator().manual_seed(seed + 7919)
    out = []
    for i in range(spec.count):
        picks = []
        for d in spec.space:
            u = float(torch.rand(1, generator=gen))
            if d.choices is not None:
                value = d.choices[min(int(u * len(d.choices)), len(d.choices) - 1)]
            elif d.log:
                value = math.exp(math.log(d.low) + u * (math.log(d.high) - math.log(d.low)))  # type: ignore[arg-type]
            else:
                value = d.low + u * (d.high - d.low)  # type: ignore[operator]
            picks.append(f"{d.key}={value}")
        out.append(MinerSpec(f"sampled{i}", picks))
    return out


def miner_configs(cc: CompeteConfig) -> tuple[list[str], list[Config], list[float]]:
    """Names, validated configs and data fractions of the training miners."""
    specs = cc.miners + sampled(cc.sample, cc.seed)
    if not specs:
        raise ConfigError("miners", "no miners: list some, or sample.count > 0")
    total = cc.epochs * cc.steps_per_epoch
    forced = [f"train.steps={total}", f"train.eval_every={total}", "checkpoint.every=0",
              "resume=false", "logger.mode=disabled", "logger.progress=false"]  # fmt: skip
    names: list[str] = []
    cfgs: list[Config] = []
    for i, spec in enumerate(specs):
        key = f"miners[{i}].overrides" if i < len(cc.miners) else "sample.space"
        try:
            node = compose([*cc.base, f"seed={cc.seed + i}", *spec.overrides, *forced])
            cfg = parse(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
        except ConfigError as err:
            raise ConfigError(key, str(err)) from None
        if not str(cfg.comm.get("_target_", "")).endswith("InProcessComm"):
            raise ConfigError(key, "miners train in this process: comm=inprocess")
        if cfg.sync.get("_target_") != "diloco.sync.All":
            raise ConfigError(key, "a miner submits after whole epochs of rounds: sync=all")
        h = int(cfg.algorithm.get("inner_steps", 1))
        if cc.steps_per_epoch % h:
            raise ConfigError(
                f"steps_per_epoch={cc.steps_per_epoch}",
                f"must be a multiple of miner {i}'s algorithm.inner_steps={h}",
            )
        if cfgs and cfg.data != cfgs[0].data:
            raise ConfigError(key, "data.* must be the same for every miner (one validator set)")
        names.append(spec.name or f"miner{i}")
        cfgs.append(cfg)
    names += [c.name for c in cc.copiers]
    if len(set(names)) != len(names):
        raise ConfigError("miners", f"names must differ: {names}")
    return names, cfgs, [s.data_fraction for s in specs]


def subset(corpus: Corpus, fraction: float, seed: int) -> Corpus:
    """A seeded ``fraction`` of the training split (the eval split untouched)."""
    if fraction >= 1.0:
        return corpus
    n = len(corpus.train)
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).narrow(
        0, 0, max(1, int(fraction * n))
    )
    keep = keep.sort().values
    labels = None if corpus.train_labels is None else corpus.train_labels[keep]
    return dataclasses.replace(
        corpus, train=corpus.train[keep], train_docs=corpus.train_docs[keep], train_labels=labels
    )
