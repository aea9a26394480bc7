"""Payload helpers for :class:`demo_optim.DeMo`: wire dtypes, sign packing, aggregation.

Everything that touches the exchanged ``[indices_g, values_g]`` tensors outside the
optimizer itself lives here: compact index dtypes, payload sizes, 1-bit sign packing,
the per-coefficient mean over senders, its inverse DCT and the ``torch.distributed``
all-gather.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from demo_optim.dct import idct_nd, sparse_idct

__all__ = [
    "GatherFn",
    "aggregate_sparse",
    "all_gather_payload",
    "compact_index_dtype",
    "decode_aggregate",
    "pack_signs",
    "payload_nbytes",
    "unpack_signs",
]

GatherFn = Callable[[list[Tensor]], Sequence[Tensor]]
"""``gather_fn(payload) -> gathered``: ``gathered[j]`` stacks payload tensor ``j`` of
every worker along a new leading dimension, in worker order."""

_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_named(name: str) -> torch.dtype:
    """``"bfloat16"`` or ``"torch.int16"`` -> the torch dtype (for configs that hold strings)."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Invalid dtype name: {name!r}")
    return dtype


def compact_index_dtype(n_coeffs: int) -> torch.dtype:
    """Return the narrowest integer dtype that holds every index below ``n_coeffs``.

    ``uint8`` up to 256 coefficients per chunk, ``int16`` up to 32768, ``int32`` up
    to 2**31, ``int64`` beyond. (Signed 16/32-bit types are used because every
    collective backend supports them; unsigned 16/32-bit tensors are barely
    supported by torch.)
    """
    if n_coeffs <= 1 << 8:
        return torch.uint8
    if n_coeffs <= 1 << 15:
        return torch.int16
    if n_coeffs <= 1 << 31:
        return torch.int32
    return torch.int64


def payload_nbytes(payload: Iterable[Tensor]) -> int:
    """Return the bytes a payload occupies on the wire: ``sum(numel * element_size)``."""
    return sum(t.numel() * t.element_size() for t in payload)


def pack_signs(values: Tensor) -> Tensor:
    """Pack the signs of ``values [..., k]`` into bits, 8 per byte.

    Bit ``i % 8`` of byte ``i // 8`` is set when ``values[..., i]`` is negative
    (``-0.0`` and ``0.0`` both count as positive).

    Returns:
        A ``uint8`` tensor of shape ``[..., ceil(k / 8)]``.
    """
    k = values.shape[-1]
    n_bytes = (k + 7) // 8
    bits = (values < 0).to(torch.uint8)
    if n_bytes * 8 != k:
        pad = bits.new_zeros((*bits.shape[:-1], n_bytes * 8 - k))
        bits = torch.cat([bits, pad], dim=-1)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    bits = bits.view(*bits.shape[:-1], n_bytes, 8)
    # The largest sum is 255, so uint8 arithmetic is exact.
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_signs`: return ``+1`` / ``-1`` values of shape ``[..., k]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :k]
    return 1.0 - 2.0 * bits.to(dtype)


def aggregate_sparse(indices: Tensor, values: Tensor, n_coeffs: int) -> Tensor:
    """Average sparse per-worker coefficients over the workers that sent each one.

    Args:
        indices: ``[W, N, k]`` int64 coefficient indices (per chunk row, in
            ``[0, n_coeffs)``, distinct within a row of one worker).
        values: ``[W, N, k]`` coefficient values.
        n_coeffs: Coefficients per chunk.

    Returns:
        ``[N, n_coeffs]``: for every coefficient, the sum of the values sent for it
        divided by the number of workers that sent it (0 where nobody did). A value
        sent by a single worker is therefore kept as is, not divided by ``W``.

    Workers are added one after the other, each with a scatter whose target indices
    are distinct, so the result is bitwise reproducible on every device (no atomic
    races in the summation order).
    """
    n_workers, n_rows, k = indices.shape
    total = values.new_zeros((n_rows, n_coeffs))
    count = values.new_zeros((n_rows, n_coeffs))
    ones = values.new_ones((n_rows, k))
    for w in range(n_workers):
        total.scatter_add_(1, indices[w], values[w])
        count.scatter_add_(1, indices[w], ones)
    return total.div_(count.clamp_(min=1))


def _sparse_is_cheaper(n_terms: int, chunk: tuple[int, ...]) -> bool:
    """Whether decoding ``n_terms`` coefficients per chunk directly beats a dense IDCT.

    A dense inverse costs ``sum(chunk)`` multiply-adds per output element (one GEMM per
    chunked dimension), the sparse one ``n_terms`` plus gathers; the factor 2 is a
    measured allowance for the latter.
    """
    return 2 * n_terms <= sum(chunk)


def decode_aggregate(indices: Tensor, values: Tensor, chunk: tuple[int, ...]) -> Tensor:
    """Aggregate gathered coefficients like :func:`aggregate_sparse` and inverse-DCT them.

    Args:
        indices: ``[W, N, k]`` int64 coefficient indices.
        values: ``[W, N, k]`` coefficient values.
        chunk: ``(c,)`` or ``(ch, cw)``.

    Returns:
        ``[N, *chunk]``: the inverse DCT of the per-coefficient mean over senders.
        When ``W * k`` is small the mean is decoded directly from the sparse terms
        (each value divided by the number of senders of its coefficient), which is
        cheaper than densifying; both paths are deterministic.
    """
    n_workers, n_rows, k = indices.shape
    n_coeffs = math.prod(chunk)
    if not _sparse_is_cheaper(n_workers * k, chunk):
        agg = aggregate_sparse(indices, values, n_coeffs)
        return idct_nd(agg.view(n_rows, *chunk), len(chunk))
    if n_workers == 1:
        return sparse_idct(indices[0], values[0], chunk)
    count = values.new_zeros((n_rows, n_coeffs))
    ones = values.new_ones((n_rows, k))
    for w in range(n_workers):
        count.scatter_add_(1, indices[w], ones)
    flat_idx = indices.permute(1, 0, 2).reshape(n_rows, n_workers * k)
    flat_val = values.permute(1, 0, 2).reshape(n_rows, n_workers * k)
    return sparse_idct(flat_idx, flat_val / count.gather(1, flat_idx), chunk)


def all_gather_payload(
    payload: Sequence[Tensor], group: dist.ProcessGroup | None = None
) -> list[Tensor]:
    """All-gather every payload tensor with ``torch.distributed``; stack by rank.

    Tensors travel as raw bytes (``uint8`` views), so dtypes a backend lacks (NCCL
    has no int16, older gloo no bfloat16) still work.
    """
    world = dist.get_world_size(group)
    raw = [t.contiguous().view(torch.uint8) for t in payload]
    outs = [[torch.empty_like(r) for _ in range(world)] for r in raw]
    handles = [
        dist.all_gather(o, r, group=group, async_op=True) for o, r in zip(outs, raw, strict=True)
    ]
    for h in handles:
        if h is not None:
            h.wait()
    return [torch.stack(o).view(t.dtype) for o, t in zip(outs, payload, strict=True)]
