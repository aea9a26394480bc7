"""DeMo in the trainer: every step, workers exchange top-k DCT coefficients of their momentum.

Peng, Quesnelle, Kingma, "DeMo: Decoupled Momentum Optimization", arXiv 2411.19870. Each
worker's inner optimizer is :class:`demo_optim.DeMo`; per step the trainer runs the local phase
on every worker (``delta = beta*delta + lr*grad``, DCT, top-k, error feedback), all-gathers the
``(indices, values)`` payloads through the communicator (bytes counted from the tensors sent),
and every worker applies the same aggregate (``p -= lr * sign(idct(mean of sent coefficients))``),
so the workers' parameters stay bitwise identical.

A run is bitwise the same in one process and over any number of ranks (tested on the default
GPT) when every process uses the same intra-op thread count: the sign step amplifies the last-bit
gradient differences that another thread count gives (see :class:`demo_optim.DeMo`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from demo_optim import DeMo
from diloco.algorithms.base import AlgorithmBase, StepContext
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

    def __init__(self, cfg: Config, group: WorkerGroup) -> None:
        self.name = cfg.name
        self.excluded_total = 0
        optimizers = getattr(group.inner, "optimizers", [])
        if not optimizers or not all(isinstance(opt, DeMo) for opt in optimizers):
            raise ConfigError("optimizer", "algorithm=demo needs optimizer=demo (demo_optim.DeMo)")

    @staticmethod
    def check(parts: Any) -> None:
        """DeMo's (index, value) payloads bypass the round exchange's codec, attack, aggregator.

        ``parts``: the run's :class:`diloco.build.Parts`.
        """
        changed = parts.exchange.customized()
        if changed:
            raise ConfigError(
                "algorithm=demo",
                f"sends its own payloads; {', '.join(changed)} must stay at their defaults",
            )

    def inner_step(self, group: WorkerGroup, ctx: StepContext) -> None:
        """Encode every worker, all-gather the payloads (one collective), check, apply once.

        On CUDA the workers encode in one batch (:meth:`demo_optim.DeMo.encode_many`, one
        launch of each kernel instead of K); on the CPU one after the other, which measured
        no slower there (4 workers of the default GPT: 67.0 ms against 66.6 ms batched, and
        69 against 90 ms in another run; ``benchmarks/README.md``).

        Every worker would apply the same aggregate to the same parameters, so worker 0
        applies it and its row is copied to the others (one decode instead of K).
        """
        group.clip_grads(ctx.grad_clip)
        group.set_lr(ctx.lr_mult)
        optimizers: list[Any] = group.optimizers
        if group.params.is_cuda:  # one batched encode of every worker (fewer kernel launches)
            payloads = DeMo.encode_many(optimizers)
        else:  # on the CPU one worker at a time is as fast (its buffers stay in cache)
            payloads = [opt.encode() for opt in optimizers]
        gathered = ctx.gather([torch.stack(parts) for parts in zip(*payloads, strict=True)])
        bounds = group.optimizers[0].index_bounds()  # type: ignore[attr-defined]
        bad = self.bad_senders(gathered, payloads[0], bounds)
        if bad.any():
            gathered = [g[~bad] for g in gathered]
        group.optimizers[0].apply(gathered)  # type: ignore[attr-defined]
        group.params[1:].copy_(group.params[0].expand_as(group.params[1:]))

    def bad_senders(
        self, gathered: list[torch.Tensor], own: list[torch.Tensor], bounds: list[int | None]
    ) -> torch.Tensor:
        """``[K]`` mask of senders with an out-of-range index or a non-finite value.

        Payloads come from untrusted peers: a bad sender is excluded from this step (logged)
        and the others' coefficients are averaged as usual. Shape and dtype are the same for
        every row of a gathered tensor, so they are checked once per tensor.
        """
        bad = torch.zeros(gathered[0].shape[0], dtype=torch.bool, device=gathered[0].device)
        for g, mine, bound in zip(gathered, own, bounds, strict=True):
            if g.shape[1:] != mine.shape or g.dtype != mine.dtype:
                raise RuntimeError(
                    f"demo: gathered payload {tuple(g.shape)} {g.dtype} does not match "
                    f"{tuple(mine.shape)} {mine.dtype}"
                )
            rows = g.flatten(1)
            if bound is not None:
                bad |= ((rows < 0) | (rows >= bound)).any(1)
            elif g.is_floating_point():
                bad |= ~torch.isfinite(rows).all(1)
        for i in torch.nonzero(bad).flatten().tolist():
            self.excluded_total += 1
            log.warning("demo: payload of worker %d excluded: index out of range or non-finite", i)
        if bad.all():
            raise RuntimeError("demo: every payload was rejected")
        return bad
