"""Chunked orthonormal DCT-II helpers used by :class:`demo_optim.DeMo`.

A tensor is cut into equal chunks, each chunk is transformed with the orthonormal
type-II discrete cosine transform (the same transform as
``scipy.fft.dct(x, type=2, norm="ortho")`` applied along every chunked dimension), and
the transform is inverted with the transposed basis (DCT-III).

Chunking rule: a dimension of size ``s`` is cut into chunks of the largest divisor of
``s`` that does not exceed the target chunk size (``chunk_size(96, 64) == 48``,
``chunk_size(131, 64) == 1`` because 131 is prime). 0-D and 1-D tensors use 1-D chunks;
tensors with two or more dimensions use 2-D chunks over their last two dimensions, with
the leading dimensions flattened.

Chunked tensors are laid out *chunk-major*: ``to_chunks`` returns ``[n_chunks, c]`` for
1-D chunks and ``[n_chunks, ch, cw]`` for 2-D chunks, where the chunks are ordered by
(leading index, chunk row, chunk column).

The transforms are matrix products with a precomputed basis (cached per size, device
and dtype), which is much faster than an FFT for the small chunk sizes used by DeMo.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "chunk_shape",
    "chunk_size",
    "dct_nd",
    "dct_basis",
    "dct_decode",
    "dct_encode",
    "from_chunks",
    "idct_nd",
    "sparse_idct",
    "to_chunks",
]


def chunk_size(size: int, target: int) -> int:
    """Return the largest divisor of ``size`` that is not above ``target``.

    Args:
        size: Length of the dimension to chunk (>= 1).
        target: Wanted chunk length (>= 1).

    Returns:
        The chunk length, e.g. ``chunk_size(100, 64) == 50`` and
        ``chunk_size(50304, 64) == 64``.

    Raises:
        ValueError: If ``size`` or ``target`` is below 1.
    """
    if size < 1 or target < 1:
        raise ValueError(f"size and target must be >= 1, got size={size}, target={target}")
    for d in range(min(size, target), 0, -1):
        if size % d == 0:
            return d
    return 1  # unreachable: 1 divides everything


def chunk_shape(shape: Sequence[int], target: int) -> tuple[int, ...]:
    """Return the chunk shape DeMo uses for a tensor of the given shape.

    Args:
        shape: Tensor shape; must have at least one element.
        target: Wanted chunk length per chunked dimension.

    Returns:
        ``(c,)`` for 0-D and 1-D shapes, ``(ch, cw)`` (for the last two dimensions)
        otherwise.
    """
    shape = tuple(shape)
    if len(shape) <= 1:
        return (chunk_size(shape[0] if shape else 1, target),)
    return (chunk_size(shape[-2], target), chunk_size(shape[-1], target))


@functools.lru_cache(maxsize=256)
def _cached_basis(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    basis = torch.cos(math.pi * (2.0 * i + 1.0) * k / (2.0 * n))
    scale = torch.full((n, 1), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0, 0] = math.sqrt(1.0 / n)
    return (basis * scale).to(device=device, dtype=dtype)


def dct_basis(
    n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Return the orthonormal DCT-II matrix ``D`` of size ``n x n``.

    ``D[k, i] = s_k * cos(pi * (2 i + 1) * k / (2 n))`` with ``s_0 = sqrt(1/n)`` and
    ``s_k = sqrt(2/n)`` otherwise, so ``D @ x`` equals
    ``scipy.fft.dct(x, type=2, norm="ortho")`` and ``D.T`` is the inverse. The matrix
    is computed in float64, cast to ``dtype`` and cached per (size, device, dtype):
    treat the returned tensor as read-only.

    Args:
        n: Transform length (>= 1).
        device: Device of the returned matrix (default: CPU).
        dtype: Floating dtype of the returned matrix.

    Returns:
        The ``[n, n]`` basis; row ``k`` is the ``k``-th cosine.
    """
    if n < 1:
        raise ValueError(f"DCT size must be >= 1, got {n}")
    return _cached_basis(n, torch.device(device if device is not None else "cpu"), dtype)


def dct_nd(x: Tensor, ndim: int = 1) -> Tensor:
    """Orthonormal DCT-II of ``x`` along its last ``ndim`` (1 or 2) dimensions."""
    if ndim == 1:
        return torch.matmul(x, dct_basis(x.shape[-1], device=x.device, dtype=x.dtype).T)
    if ndim == 2:
        dh = dct_basis(x.shape[-2], device=x.device, dtype=x.dtype)
        dw = dct_basis(x.shape[-1], device=x.device, dtype=x.dtype)
        # Right factor first: for a contiguous x it is a single [.. * h, w] x [w, w] GEMM.
        return torch.matmul(dh, torch.matmul(x, dw.T))
    raise ValueError(f"ndim must be 1 or 2, got {ndim}")


def idct_nd(x: Tensor, ndim: int = 1) -> Tensor:
    """Inverse of :func:`dct_nd` (orthonormal DCT-III) along the last ``ndim`` dimensions."""
    if ndim == 1:
        return torch.matmul(x, dct_basis(x.shape[-1], device=x.device, dtype=x.dtype))
    if ndim == 2:
        dh = dct_basis(x.shape[-2], device=x.device, dtype=x.dtype)
        dw = dct_basis(x.shape[-1], device=x.device, dtype=x.dtype)
        return torch.matmul(dh.T, torch.matmul(x, dw))
    raise ValueError(f"ndim must be 1 or 2, got {ndim}")


def sparse_idct(indices: Tensor, values: Tensor, chunk: Sequence[int]) -> Tensor:
    """Inverse DCT of chunks given by a few coefficients each, without densifying.

    Equivalent to scattering ``values`` at ``indices`` into zero coefficient chunks and
    calling :func:`idct_nd`, but costs ``k`` multiply-adds per output element instead
    of ``ch + cw`` (or ``c``), so it is faster when ``k`` is small. Repeated indices in
    a row are summed.

    Args:
        indices: ``[N, k]`` int64 flat (row-major) coefficient positions per chunk.
        values: ``[N, k]`` coefficient values.
        chunk: ``(c,)`` or ``(ch, cw)``.

    Returns:
        ``[N, *chunk]`` decoded chunks.
    """
    if len(chunk) == 1:
        basis = dct_basis(chunk[0], device=values.device, dtype=values.dtype)
        return torch.bmm(values.unsqueeze(1), basis[indices]).squeeze(1)
    ch, cw = chunk
    dh = dct_basis(ch, device=values.device, dtype=values.dtype)
    dw = dct_basis(cw, device=values.device, dtype=values.dtype)
    left = dh[indices // cw] * values.unsqueeze(-1)  # [N, k, ch]
    right = dw[indices % cw]  # [N, k, cw]
    return torch.bmm(left.transpose(1, 2), right)


def to_chunks(x: Tensor, chunk: Sequence[int]) -> Tensor:
    """Cut ``x`` into chunk-major chunks of shape ``chunk``.

    Args:
        x: Tensor to cut; 0-D/1-D with a 1-D ``chunk`` or >= 2-D with a 2-D ``chunk``.
        chunk: ``(c,)`` or ``(ch, cw)``, dividing the chunked dimensions.

    Returns:
        ``[n_chunks, c]`` or ``[n_chunks, ch, cw]`` (a copy when a permutation is
        needed).
    """
    if len(chunk) == 1:
        return rearrange(x.reshape(-1), "(n c) -> n c", c=chunk[0])
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    return rearrange(x, "l (nh ch) (nw cw) -> (l nh nw) ch cw", ch=chunk[0], cw=chunk[1])


def from_chunks(chunks: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_chunks`: reassemble chunk-major ``chunks`` into ``shape``."""
    shape = tuple(shape)
    if chunks.dim() == 2:
        return chunks.reshape(shape)
    ch, cw = chunks.shape[-2], chunks.shape[-1]
    h, w = shape[-2], shape[-1]
    out = rearrange(
        chunks, "(l nh nw) ch cw -> l (nh ch) (nw cw)", nh=h // ch, nw=w // cw, ch=ch, cw=cw
    )
    return out.reshape(shape)


def dct_encode(x: Tensor, target_chunk: int = 64) -> Tensor:
    """Chunk ``x`` with DeMo's rule and return the DCT-II coefficients of every chunk.

    Args:
        x: Floating tensor of any shape with at least one element.
        target_chunk: Wanted chunk length per chunked dimension.

    Returns:
        Coefficients of shape ``[n_chunks, c]`` or ``[n_chunks, ch, cw]``.
    """
    chunk = chunk_shape(x.shape, target_chunk)
    return dct_nd(to_chunks(x, chunk), ndim=len(chunk))


def dct_decode(coeffs: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`dct_encode`: rebuild a tensor of ``shape`` from coefficients."""
    return from_chunks(idct_nd(coeffs, ndim=coeffs.dim() - 1), shape)
