"""Layers over a leading replica dimension: K models' weights stacked as ``[K, ...]``.

The built-in models' ``batched_loss(weights, idx, targets)`` run K replicas at once with
these, so that K simulated workers of batch B cost about one model on K x B sequences: every
matmul is one ``bmm`` over the replicas, attention folds the replicas into its batch, and
there is one cross-entropy over all tokens. ``torch.func.vmap`` over ``functional_call`` would
be general, but its SDPA on the CPU falls back to a per-replica loop (and on CUDA it fails for
some shapes), so the built-in models carry a batched forward of their own.

Weights arrive as strided views of the worker matrix (row stride P): nothing here copies a
weight, and :class:`BatchedLinear` returns each weight gradient in the weight's own layout
``[K, out, in]``, so the gradients land in the matrix without a transposed copy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class BatchedLinear(torch.autograd.Function):
    """``y[k] = x[k] @ w[k].T`` for ``x [K, N, in]`` and ``w [K, out, in]`` (no bias).

    Under autocast both products run in the autocast dtype (bf16), forward and backward;
    autograd returns the weight gradient in the weight's fp32.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        """One ``bmm`` over the replicas."""
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            low = torch.get_autocast_dtype(kind)
            x, w = x.to(low), w.to(low)
        ctx.save_for_backward(x, w)
        return torch.bmm(x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        """``dx = g @ w``, ``dw = g.T @ x``: both contiguous in their own layout."""
        x, w = ctx.saved_tensors
        grad = grad.to(x.dtype)
        return torch.bmm(grad, w), torch.bmm(grad.transpose(1, 2), x)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """Per-replica ``nn.Linear``: ``x [K, N, in]``, ``w [K, out, in]``, ``b [K, out]``."""
    y: Tensor = BatchedLinear.apply(x, w)
    return y if b is None else y + b[:, None]


def layer_norm(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Per-replica ``nn.LayerNorm`` over the last dim: ``x [K, N, C]``, ``w, b [K, C]``."""
    x = F.layer_norm(x, x.shape[-1:], eps=eps)
    if w is not None:
        x = x * w[:, None]
    return x if b is None else x + b[:, None]


def embedding(table: Tensor, idx: Tensor) -> Tensor:
    """Per-replica lookup: ``table [K, V, C]``, ``idx [K, B, T]`` -> ``[K, B, T, C]``."""
    rows = torch.arange(table.shape[0], device=idx.device).view(-1, *([1] * (idx.dim() - 1)))
    return table[rows, idx]


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Each replica's mean next-token cross-entropy: ``logits [K, N, V]`` -> ``[K]``.

    Entries of ``targets`` equal to -100 are ignored, as in the per-model loss.
    """
    k = logits.shape[0]
    flat = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
    keep = (targets.reshape(k, -1) != -100).to(ce.dtype)
    return (ce.view(k, -1) * keep).sum(1) / keep.sum(1)
