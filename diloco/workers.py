"""The worker matrix: K model replicas whose parameters are rows of one ``[K, P]`` tensor.

Every replica's parameters are views into its row of :attr:`WorkerGroup.params`, and their
gradients views into :attr:`WorkerGroup.grads`, so the sync path is matrix math on rows:
a pseudo-gradient is ``global[None] - params``, a resync is one ``copy_``. The global model's
parameters are views into the ``[P]`` vector :attr:`WorkerGroup.global_param`, a single
``nn.Parameter`` that the outer optimizer steps.

Inner steps run as a Python loop over the replicas, which works for any ``nn.Module`` whose
``forward(idx, targets)`` returns ``(logits, loss)``. Inner optimizers stay local: one that
would exchange on its own (:class:`demo_optim.DeMo` under a process group) is given a gather
over its own worker only; exchanges are the algorithm's business.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
Batch = tuple[torch.Tensor, torch.Tensor]


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices (>= 2-D), none on vectors (biases, norms), as in GPT-2."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups: list[dict[str, Any]] = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _bind(model: nn.Module, flat: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Point each parameter's data (and grad) at consecutive slices of ``flat`` (``grad``)."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.data = flat[offset : offset + n].view_as(p)
        if grad is not None:
            p.grad = grad[offset : offset + n].view_as(p)
        offset += n


def _local_gather(payload: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A gather over one worker: each payload tensor gains a leading dim of size 1."""
    return [t.unsqueeze(0) for t in payload]


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup then constant or cosine decay to ``min_ratio`` of the base rate."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WorkerGroup:
    """The ``K_local`` workers hosted by this process, plus the global model.

    Args:
        model: the initial global model (its parameters are copied, then rebound).
        worker_ids: global ids of the workers hosted here.
        optimizer: builds an inner optimizer from parameter groups.
    """

    def __init__(
        self, model: nn.Module, worker_ids: Sequence[int], optimizer: OptimizerFactory
    ) -> None:
        self.worker_ids = list(worker_ids)
        params = list(model.parameters())
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("the worker matrix needs fp32 parameters")
        self.num_params = sum(p.numel() for p in params)
        init = torch.cat([p.detach().reshape(-1) for p in params])
        k = len(self.worker_ids)
        self.replicas = [copy.deepcopy(model) for _ in range(k)]
        self.global_model = model
        self.global_param = nn.Parameter(init.clone())
        self.global_param.grad = torch.zeros_like(init)
        _bind(model, self.global_param.data, None)
        model.requires_grad_(False)
        self.params = init.repeat(k, 1)
        self.grads = torch.zeros_like(self.params)
        for i, replica in enumerate(self.replicas):
            _bind(replica, self.params[i], self.grads[i])
        self.optimizers = [optimizer(param_groups(r)) for r in self.replicas]
        self.active = [True] * k  # which workers ran the current step
        self.grad_norms = torch.zeros(k)  # each worker's gradient norm before clipping
        self.anchors: torch.Tensor | None = None  # per-worker pulled models (track_origins)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
            if hasattr(opt, "gather_fn"):  # an optimizer that exchanges on its own: keep local
                opt.gather_fn = _local_gather

    @property
    def size(self) -> int:
        """Number of workers hosted here (``K_local``)."""
        return len(self.replicas)

    def forward_backward(self, batches: Sequence[Batch | None]) -> torch.Tensor:
        """Forward and backward per worker on its batch (None: idle this step).

        Returns the losses of the workers that ran.
        """
        self.grads.zero_()
        self.active = [b is not None for b in batches]
        losses = []
        for replica, batch in zip(self.replicas, batches, strict=True):
            if batch is not None:
                _, loss = replica(*batch)
                loss.backward()
                losses.append(loss.detach())
        if not losses:  # every worker here sits out this step (others elsewhere may run)
            return torch.zeros(0, device=self.params.device)
        return torch.stack(losses)

    def clip_grads(self, max_norm: float) -> torch.Tensor:
        """Clip each worker's whole gradient to ``max_norm`` (0: no clipping); returns norms.

        The norms before clipping are kept in :attr:`grad_norms` (for metrics).
        """
        norms = self.grads.norm(dim=1)
        if max_norm > 0:
            scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            self.grads.mul_(scale[:, None])
        self.grad_norms = norms
        return norms

    def set_lr(self, lr_mult: float) -> None:
        """Set every inner optimizer's rate to ``lr_mult`` times its base rate."""
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_mult

    def optimizer_step(self, lr_mult: float) -> None:
        """One inner optimizer step on every worker, at ``lr_mult`` times the base rate."""
        self.set_lr(lr_mult)
        for opt, active in zip(self.optimizers, self.active, strict=True):
            if active:
                opt.step()

    def broadcast_global(self) -> None:
        """Copy the global model into every worker's row."""
        self.params.copy_(self.global_param.data.expand_as(self.params))

    def track_origins(self) -> None:
        """Remember, per worker, the model it last pulled (workers pull at different times)."""
        self.anchors = self.params.clone()

    def origins(self) -> torch.Tensor:
        """The model each worker started from: ``[K_local, P]``, or ``[1, P]`` (the global)."""
        return self.global_param.data[None] if self.anchors is None else self.anchors

    def pull(self, workers: Sequence[int] | None = None) -> None:
        """Copy the global model into the rows of ``workers`` (global ids; None: every row)."""
        if workers is None:
            self.broadcast_global()
            if self.anchors is not None:
                self.anchors.copy_(self.params)
            return
        for w in workers:
            row = self.worker_ids.index(w)
            self.params[row].copy_(self.global_param.data)
            if self.anchors is not None:
                self.anchors[row].copy_(self.global_param.data)

    def state_dict(self) -> dict[str, Any]:
        """Worker rows, global model, pulled models if tracked, every inner optimizer's state."""
        return {
            "params": self.params.clone(),
            "global": self.global_param.data.clone(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            **({"anchors": self.anchors.clone()} if self.anchors is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore rows, global model and inner optimizer states in place (views stay bound)."""
        self.params.copy_(state["params"])
        self.global_param.data.copy_(state["global"])
        if self.anchors is not None:  # older checkpoints: every worker sat at its pull
            self.anchors.copy_(state.get("anchors", state["params"]))
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
