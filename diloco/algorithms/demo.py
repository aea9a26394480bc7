"""DeMo in the trainer: every step, workers exchange top-k DCT coefficients of their momentum.

Peng, Quesnelle, Kingma, "DeMo: Decoupled Momentum Optimization", arXiv 2411.19870. Each
worker's inner optimizer is :class:`demo_optim.DeMo`; per step the trainer runs the local phase
on every worker (``delta = beta*delta + lr*grad``, DCT, top-k, error feedback), all-gathers the
``(indices, values)`` payloads through the communicator (bytes counted from the tensors sent),
and every worker applies the same aggregate (``p -= lr * sign(idct(mean of sent coefficients))``),
so the workers' parameters stay bitwise identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from demo_optim import DeMo
from diloco.algorithms.base import AlgorithmBase, Gather
from diloco.config import ConfigError
from diloco.workers import WorkerGroup


class DeMoSync(AlgorithmBase):
    """Runs K :class:`demo_optim.DeMo` optimizers with the exchange through the communicator."""

    @dataclass
    class Config:
        """A round is one step; compression settings live in ``conf/optimizer/demo.yaml``."""

        name: str = "demo"

    inner_steps = 1
    uses_exchange = False  # DeMo's (index, value) payloads bypass codec, attack, aggregator

    def __init__(self, cfg: Config, group: WorkerGroup) -> None:
        self.name = cfg.name
        if not all(isinstance(opt, DeMo) for opt in group.optimizers):
            raise ConfigError("optimizer", "algorithm=demo needs optimizer=demo (demo_optim.DeMo)")

    def step_optimizers(self, group: WorkerGroup, gather: Gather, lr_mult: float) -> None:
        """Encode on every worker, all-gather each payload tensor, apply on every worker."""
        group.set_lr(lr_mult)
        payloads = [opt.encode() for opt in group.optimizers]  # type: ignore[attr-defined]
        gathered = [gather(torch.stack(parts)) for parts in zip(*payloads, strict=True)]
        for opt in group.optimizers:
            opt.apply(gathered)  # type: ignore[attr-defined]
