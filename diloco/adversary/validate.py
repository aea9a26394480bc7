"""Validation of untrusted payloads received from peers.

A payload is accepted only if it is a dense tensor of the expected dtype and shape whose values
are finite, within ``[0, index_bound)`` for integer (index) payloads, and at most ``max_abs``
in magnitude. The checks never raise: anything odd (``None``, bytes, sparse or meta tensors,
empty tensors of the wrong shape) becomes a one-line rejection reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _reason(
    p: Any,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    index_bound: int | None,
    max_abs: float | None,
) -> str | None:
    """Why ``p`` is rejected, or ``None`` if it passes."""
    if not isinstance(p, torch.Tensor):
        return f"not a tensor ({type(p).__name__})"
    if p.layout != torch.strided:
        return f"unsupported layout {str(p.layout).removeprefix('torch.')}"
    if p.is_meta:
        return "meta tensor without data"
    if p.dtype != dtype:
        return f"dtype {str(p.dtype).removeprefix('torch.')} != {str(dtype).removeprefix('torch.')}"
    if tuple(p.shape) != tuple(shape):
        return f"shape {tuple(p.shape)} != {tuple(shape)}"
    if p.numel() == 0:
        return None
    x = p.detach()
    if x.is_floating_point() or x.is_complex():
        if not bool(torch.isfinite(x).all()):
            return "non-finite values"
    elif index_bound is not None and x.dtype != torch.bool:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= index_bound:
            return f"index out of range [0, {index_bound}): found {lo if lo < 0 else hi}"
    if max_abs is not None:
        mag = float((x.abs() if x.is_complex() else x.to(torch.float64)).abs().max())
        if mag > max_abs:
            return f"magnitude {mag:.3g} above {max_abs:.3g}"
    return None


def validate_payloads(
    payloads: Sequence[Any],
    *,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    index_bound: int | None = None,
    max_abs: float | None = None,
) -> tuple[list[int], dict[int, str]]:
    """Split per-worker payloads into accepted indices and rejection reasons.

    Args:
        payloads: One entry per worker; anything, since peers are untrusted.
        shape: The exact expected shape.
        dtype: The exact expected dtype.
        index_bound: For integer payloads (e.g. top-k indices), values must lie in
            ``[0, index_bound)``.
        max_abs: If set, reject payloads whose largest absolute value exceeds it.

    Returns:
        ``(accepted, rejected)``: the indices that passed, in order, and for each rejected
        index a one-line reason such as ``"worker 3: shape (5,) != (6,)"``. Never raises.
    """
    accepted: list[int] = []
    rejected: dict[int, str] = {}
    for i, p in enumerate(payloads):
        try:
            why = _reason(p, shape, dtype, index_bound, max_abs)
        except Exception as err:  # untrusted input must never crash the round
            why = f"unreadable payload ({type(err).__name__})"
        if why is None:
            accepted.append(i)
        else:
            rejected[i] = f"worker {i}: {why}"
    return accepted, rejected
