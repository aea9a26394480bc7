"""Parameter layout of :class:`demo_optim.DeMo`: geometries, their members, checks.

Parameters that share chunk shape, ``k``, ``alpha``, dtype and device form one
*geometry*; the optimizer processes each geometry as one chunk-major buffer and sends
one ``[indices, values]`` pair per geometry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from demo_optim.dct import chunk_shape


@dataclass
class _Member:
    param: Tensor
    group: int  # index into optimizer.param_groups
    n_chunks: int
    split: tuple[int, ...]  # view of a param-shaped tensor before the chunk-major permute
    piece: tuple[int, ...]  # chunk-major shape of the member's slice of the group buffer


@dataclass
class _Geometry:
    """Parameters that share chunk shape, k, alpha, dtype and device."""

    chunk: tuple[int, ...]
    k: int
    alpha: float
    dtype: torch.dtype
    device: torch.device
    index_dtype: torch.dtype
    members: list[_Member] = field(default_factory=list)

    @property
    def n_chunks(self) -> int:
        return sum(m.n_chunks for m in self.members)

    @property
    def n_coeffs(self) -> int:
        return math.prod(self.chunk)

    @property
    def sizes(self) -> list[int]:
        return [m.n_chunks for m in self.members]

    def tensor_views(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Chunk-major views (no copy) of contiguous param-shaped tensors."""
        if len(self.chunk) == 1:
            return [t.view(m.piece) for t, m in zip(tensors, self.members, strict=True)]
        return [
            t.view(m.split).permute(0, 2, 1, 3) for t, m in zip(tensors, self.members, strict=True)
        ]

    def piece_views(self, buf: Tensor) -> list[Tensor]:
        """Per-member views of a ``[n_chunks, *chunk]`` group tensor."""
        return [s.view(m.piece) for s, m in zip(buf.split(self.sizes), self.members, strict=True)]

    def by_group(self) -> dict[int, list[int]]:
        """Member positions keyed by param-group index."""
        out: dict[int, list[int]] = {}
        for i, m in enumerate(self.members):
            out.setdefault(m.group, []).append(i)
        return out


@dataclass
class _Layout:
    geometries: list[_Geometry]
    by_group: list[list[Tensor]]  # participating params of each param group


def _check_hparams(
    lr: Any,
    compression_decay: Any,
    compression_topk: Any,
    compression_chunk: Any,
    weight_decay: Any,
    alpha: Any,
) -> None:
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= compression_decay < 1.0:
        raise ValueError(f"Invalid compression_decay (must be in [0, 1)): {compression_decay}")
    if isinstance(compression_topk, bool) or not isinstance(compression_topk, int):
        raise ValueError(f"Invalid compression_topk (must be an int): {compression_topk!r}")
    if compression_topk < 1:
        raise ValueError(f"Invalid compression_topk (must be >= 1): {compression_topk}")
    if isinstance(compression_chunk, bool) or not isinstance(compression_chunk, int):
        raise ValueError(f"Invalid compression_chunk (must be an int): {compression_chunk!r}")
    if compression_chunk < 1:
        raise ValueError(f"Invalid compression_chunk (must be >= 1): {compression_chunk}")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Invalid alpha (must be in [0, 1]): {alpha}")


def build_layout(
    param_groups: Sequence[dict[str, Any]],
    resolve_index_dtype: Callable[[int], torch.dtype],
) -> _Layout:
    """Group the participating parameters of ``param_groups`` by geometry.

    Args:
        param_groups: The optimizer's parameter groups (hyperparameters re-checked).
        resolve_index_dtype: Wire index dtype for a chunk of ``n_coeffs`` elements.

    Returns:
        The geometries in order of first appearance, and the participating
        parameters (``requires_grad``, at least one element) of every group.

    Raises:
        ValueError: On an invalid group hyperparameter or a non-contiguous parameter.
    """
    geometries: dict[tuple[Any, ...], _Geometry] = {}
    by_group: list[list[Tensor]] = []
    for gi, group in enumerate(param_groups):
        _check_hparams(
            group["lr"],
            group["compression_decay"],
            group["compression_topk"],
            group["compression_chunk"],
            group["weight_decay"],
            group["alpha"],
        )
        members: list[Tensor] = []
        for p in group["params"]:
            if not p.requires_grad or p.numel() == 0:
                continue
            if not p.is_contiguous():
                raise ValueError("DeMo needs contiguous parameters; got a non-contiguous one")
            chunk = chunk_shape(p.shape, group["compression_chunk"])
            n_coeffs = math.prod(chunk)
            k = max(1, min(group["compression_topk"], n_coeffs))
            gkey = (chunk, k, float(group["alpha"]), p.dtype, p.device)
            geo = geometries.get(gkey)
            if geo is None:
                index_dtype = resolve_index_dtype(n_coeffs)
                geo = _Geometry(chunk, k, float(group["alpha"]), p.dtype, p.device, index_dtype)
                geometries[gkey] = geo
            split: tuple[int, ...]
            piece: tuple[int, ...]
            if len(chunk) == 1:
                n = p.numel() // chunk[0]
                split = piece = (n, chunk[0])
            else:
                ch, cw = chunk
                width = p.shape[-1]
                rows = p.numel() // (ch * width)
                split = (rows, ch, width // cw, cw)
                piece = (rows, width // cw, ch, cw)
                n = rows * (width // cw)
            geo.members.append(_Member(p, gi, n, split, piece))
            members.append(p)
        by_group.append(members)
    return _Layout(list(geometries.values()), by_group)
