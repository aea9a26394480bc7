"""The worker matrix: K model replicas whose parameters are rows of one ``[K, P]`` tensor.

Every replica's parameters are views into its row of :attr:`WorkerGroup.params`, and their
gradients views into :attr:`WorkerGroup.grads`, so the sync path is matrix math on rows:
a pseudo-gradient is ``global[None] - params``, a resync is one ``copy_``. The global model's
parameters are views into the ``[P]`` vector :attr:`WorkerGroup.global_param`, a single
``nn.Parameter`` that the outer optimizer steps.

Two ways to run the inner steps (``workers.execution``):

* ``batched``: one forward and backward for all replicas, through the model's
  ``batched_loss(weights, idx, targets)`` (the built-in models have one: every layer is one
  ``bmm`` over the replicas; see :mod:`diloco.models.batched`), with the weights as strided
  views of the matrix rows, and the inner optimizer as one update of the matrix
  (:mod:`diloco.inner`; AdamW and SGD, bitwise equal to K torch optimizers; any other, such
  as DeMo or Muon, one torch optimizer per worker on its row's views). A worker costs about
  what its tokens cost one model, for any K.
* ``loop``: a Python loop over the replicas, each with its own forward, backward and torch
  optimizer; works for any ``nn.Module`` whose ``forward(idx, targets)`` returns
  ``(logits, loss)`` and any optimizer.

``auto`` (the default) batches when the model has ``batched_loss``, with one worker per process
too, so that a worker's numbers do not depend on how many share its process: with one intra-op
thread they are bitwise the same for any placement (simulated == torch.distributed; with more
threads a ``bmm`` splits its work by replica count and the last bits differ). Batched and loop
agree to fp32 rounding (batched matmuls sum in another order; tested per algorithm); dropout
draws other masks. Batched activations of all K replicas live at once (as for one model on
K x B sequences). Inner optimizers stay local: one that would exchange on its own
(:class:`demo_optim.DeMo` under a process group) is given a gather over its own worker only;
exchanges are the algorithm's business.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from diloco.inner import LoopOptimizers, OptimizerFactory, matrix_form, param_groups

Batch = tuple[torch.Tensor, torch.Tensor]
Execution = Literal["auto", "loop", "batched"]


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
        execution: ``auto``, ``loop`` or ``batched`` (see the module docstring).
        precision: ``fp32``, or ``bf16``: the inner forward and backward under bf16 autocast
            (the worker matrix, gradients and optimizer state stay fp32).
        compile: ``torch.compile`` the batched forward and backward (batched only).

    Raises:
        ExecutionError: ``batched`` for a model without ``batched_loss``.
    """

    def __init__(
        self,
        model: nn.Module,
        worker_ids: Sequence[int],
        optimizer: OptimizerFactory,
        execution: Execution = "auto",
        precision: str = "fp32",
        compile: bool = False,
    ) -> None:
        self.worker_ids = list(worker_ids)
        params = list(model.parameters())
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("the worker matrix needs fp32 parameters")
        self.num_params = sum(p.numel() for p in params)
        init = torch.cat([p.detach().reshape(-1) for p in params])
        k = len(self.worker_ids)
        self.batched = resolve_execution(model, execution)
        self.bf16 = precision == "bf16"  # autocast of the inner forward and backward
        if compile and not self.batched:
            raise ExecutionError(
                "workers.compile=true compiles the batched step: use batched or auto"
            )
        self.replicas = [copy.deepcopy(model) for _ in range(1 if self.batched else k)]
        self.global_model = model
        self.global_param = nn.Parameter(init.clone())
        self.global_param.grad = torch.zeros_like(init)
        _bind(model, self.global_param.data, None)
        model.requires_grad_(False)
        self.params = init.repeat(k, 1)
        self.grads = torch.zeros_like(self.params)
        for i, replica in enumerate(self.replicas):
            _bind(replica, self.params[i], self.grads[i])
        self.inner: Any = self._inner_optimizers(optimizer)
        loss = getattr(self.replicas[0], "batched_loss", None)
        self._batched_loss: Any = torch.compile(loss) if compile else loss
        self.active = [True] * k  # which workers ran the current step
        self.grad_norms = torch.zeros(k)  # each worker's gradient norm before clipping
        self.anchors: torch.Tensor | None = None  # per-worker pulled models (track_origins)
        # the batched forward's weights: per-parameter [K, *shape] views of the matrix rows
        sizes = [p.numel() for p in params]
        names = [n for n, _ in model.named_parameters()]
        self._views = {
            n: (w.view(k, *p.shape), g.view(k, *p.shape))
            for n, p, w, g in zip(
                names, params, self.params.split(sizes, 1), self.grads.split(sizes, 1),
                strict=True,
            )
        }  # fmt: skip

    def _inner_optimizers(self, optimizer: OptimizerFactory) -> Any:
        """The matrix form of the optimizer when batched and there is one, else a loop."""
        probe = optimizer(param_groups(self.replicas[0]))
        form = matrix_form(probe) if self.batched else None
        if form is not None:
            return form(self.params, self.grads, probe, list(self.replicas[0].parameters()))
        if self.batched:  # a torch optimizer per worker needs a replica's parameter views
            for i in range(1, self.size):
                self.replicas.append(copy.deepcopy(self.replicas[0]))
                _bind(self.replicas[i], self.params[i], self.grads[i])
        optimizers = [probe] + [optimizer(param_groups(r)) for r in self.replicas[1:]]
        for opt in optimizers:
            if hasattr(opt, "gather_fn"):  # an optimizer that exchanges on its own: keep local
                opt.gather_fn = _local_gather
        return LoopOptimizers(optimizers)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The per-worker torch optimizers (loop form only)."""
        if self.inner.matrix:
            raise AttributeError("the inner optimizer is one matrix update (workers.execution)")
        return list(self.inner.optimizers)

    @property
    def size(self) -> int:
        """Number of workers hosted here (``K_local``)."""
        return len(self.worker_ids)

    def forward_backward(self, batches: Sequence[Batch | None]) -> torch.Tensor:
        """Forward and backward per worker on its batch (None: idle this step).

        Returns the losses of the workers that ran.
        """
        self.active = [b is not None for b in batches]
        if not any(self.active):  # every worker here sits out this step (others may run)
            self.grads.zero_()
            return torch.zeros(0, device=self.params.device)
        kind = self.params.device.type
        with torch.autocast(kind, torch.bfloat16, enabled=self.bf16):
            return self._forward_backward(batches)

    def _forward_backward(self, batches: Sequence[Batch | None]) -> torch.Tensor:
        if self.batched:
            return self._forward_backward_batched([b for b in batches if b is not None])
        self.grads.zero_()
        losses = []
        for replica, batch in zip(self.replicas, batches, strict=True):
            if batch is not None:
                _, loss = replica(*batch)
                loss.backward()
                losses.append(loss.detach().float())
        return torch.stack(losses)

    def _forward_backward_batched(self, batches: list[Batch]) -> torch.Tensor:
        """All active replicas in one pass of ``batched_loss``; gradients into their rows."""
        rows = [i for i, a in enumerate(self.active) if a]
        every = len(rows) == self.size
        index = torch.tensor(rows, device=self.params.device)
        leaves = {
            n: (w if every else w[index]).detach().requires_grad_()
            for n, (w, _) in self._views.items()
        }
        idx = torch.stack([x for x, _ in batches])
        targets = torch.stack([y for _, y in batches])
        assert self._batched_loss is not None
        losses: torch.Tensor = self._batched_loss(leaves, idx, targets)
        losses.sum().backward()
        if not every:
            self.grads.zero_()
        for n, (_, g) in self._views.items():
            grad = leaves[n].grad
            assert grad is not None
            if every:
                g.copy_(grad)
            else:
                g.index_copy_(0, index, grad)
        return losses.detach().float()

    def summary(self) -> dict[str, Any]:
        """Nothing of its own for ``summary.json`` (islands report their engine)."""
        return {}

    @torch.no_grad()
    def evaluate(self, eval_set: Sequence[Batch], is_main: bool) -> float:
        """Mean loss of the global model on ``eval_set`` (the main process; others: NaN)."""
        if not is_main:
            return float("nan")
        model = self.global_model
        was_training = model.training
        model.eval()
        total = sum(model(x, y)[1].item() * x.shape[0] for x, y in eval_set)
        model.train(was_training)
        return total / sum(x.shape[0] for x, _ in eval_set)

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
        self.inner.set_lr(lr_mult)

    def optimizer_step(self, lr_mult: float) -> None:
        """One inner optimizer step on every worker that ran, at ``lr_mult`` times the base rate."""
        self.set_lr(lr_mult)
        self.inner.step(self.active)

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
            **self.inner.state_dict(),
            **({"anchors": self.anchors.clone()} if self.anchors is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore rows, global model and inner optimizer states in place (views stay bound)."""
        self.params.copy_(state["params"])
        self.global_param.data.copy_(state["global"])
        if self.anchors is not None:  # older checkpoints: every worker sat at its pull
            self.anchors.copy_(state.get("anchors", state["params"]))
        self.inner.load_state_dict(state)


class ExecutionError(ValueError):
    """The model cannot run the requested ``workers.execution``."""


def resolve_execution(model: nn.Module, execution: Execution) -> bool:
    """Whether ``workers.execution`` batches the replicas of ``model`` (any number of them)."""
    able = callable(getattr(model, "batched_loss", None))
    if execution == "batched" and not able:
        raise ExecutionError(
            f"{type(model).__name__} has no batched_loss(weights, idx, targets); "
            "use workers.execution=loop or auto"
        )
    return execution == "batched" or (execution == "auto" and able)
