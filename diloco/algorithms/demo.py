"""DeMo in the trainer: every step, workers exchange top-k DCT coefficients of their momentum.

Peng, Quesnelle, Kingma, "DeMo: Decoupled Momentum Optimization", arXiv 2411.19870. Each
worker's inner optimizer is :class:`demo_optim.DeMo`; per step the trainer runs the local phase
on every worker (``delta = beta*delta + lr*grad``, DCT, top-k, error feedback), all-gathers the
``(indices, values)`` payloads through the communicator (bytes counted from the tensors sent),
and every worker applies the same aggregate (``p -= lr * sign(idct(mean of sent coefficients))``),
so the workers' parameters stay bitwise identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from demo_optim import DeMo
from diloco.adversary.validate import validate_payloads
from diloco.algorithms.base import AlgorithmBase, Gather
from diloco.config import ConfigError
from diloco.workers import WorkerGroup

log = logging.getLogger(__name__)


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
        self.excluded_total = 0
        if not all(isinstance(opt, DeMo) for opt in group.optimizers):
            raise ConfigError("optimizer", "algorithm=demo needs optimizer=demo (demo_optim.DeMo)")

    def step_optimizers(self, group: WorkerGroup, gather: Gather, lr_mult: float) -> None:
        """Encode on every worker, all-gather each payload tensor, check it, apply everywhere."""
        group.set_lr(lr_mult)
        payloads = [opt.encode() for opt in group.optimizers]  # type: ignore[attr-defined]
        gathered = [gather(torch.stack(parts)) for parts in zip(*payloads, strict=True)]
        bounds = group.optimizers[0].index_bounds()  # type: ignore[attr-defined]
        keep = self.valid_senders(gathered, payloads[0], bounds)
        if len(keep) < gathered[0].shape[0]:
            gathered = [g[keep] for g in gathered]
        for opt in group.optimizers:
            opt.apply(gathered)  # type: ignore[attr-defined]

    def valid_senders(
        self, gathered: list[torch.Tensor], own: list[torch.Tensor], bounds: list[int | None]
    ) -> list[int]:
        """Senders whose payload tensors all have the expected shape, dtype, range, values.

        Payloads come from untrusted peers: a worker with any bad tensor is excluded from
        this step (logged); the others' coefficients are averaged as usual.
        """
        keep = []
        for i in range(gathered[0].shape[0]):
            reasons: list[str] = []
            for g, mine, bound in zip(gathered, own, bounds, strict=True):
                _, bad = validate_payloads(
                    [g[i]], shape=tuple(mine.shape), dtype=mine.dtype, index_bound=bound
                )
                reasons += bad.values()
            if reasons:
                self.excluded_total += 1
                log.warning("demo: payload of worker %d excluded: %s", i, reasons[0])
            else:
                keep.append(i)
        if not keep:
            raise RuntimeError("demo: every payload was rejected")
        return keep
