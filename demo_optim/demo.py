"""DeMo: Decoupled Momentum Optimization (Peng, Quesnelle, Kingma 2024).

See :class:`DeMo` for the algorithm, the options and the payload layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from demo_optim.dct import chunk_shape, dct_nd, idct_nd, sparse_idct

__all__ = [
    "DeMo",
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


class DeMo(Optimizer):
    r"""DeMo, Decoupled Momentum Optimization (Peng, Quesnelle & Kingma, 2024).

    Reference: B. Peng, J. Quesnelle, D. P. Kingma, *DeMo: Decoupled Momentum
    Optimization*, arXiv:2411.19870 (2024). Defaults reproduce the authors' reference
    implementation (``bloc97/DeMo``).

    Every worker keeps its own momentum ``delta`` and only a few fast-moving
    components of it are shared. For each parameter ``p`` with gradient ``g`` and
    learning rate ``lr``, one step is::

        p     <- p * (1 - lr * weight_decay)                    # decoupled decay
        delta <- compression_decay * delta + lr * g             # local momentum
        C     <- DCT(chunks(delta))                              # orthonormal DCT-II
        S     <- top-k of C by |value| in every chunk            # (index, value) pairs
        delta <- delta - alpha * IDCT(S)                         # error feedback
        A     <- per coefficient: mean of S over the workers that sent it
        p     <- p - lr * sign(IDCT(A))                          # signSGD on the result

    Chunks: each chunked dimension of size ``s`` is cut into pieces of the largest
    divisor of ``s`` not above ``compression_chunk`` (96 -> 48, 131 -> 1);
    1-D tensors use 1-D chunks, tensors with more dimensions 2-D chunks over their
    last two dimensions (leading dimensions flattened). ``k`` is
    ``compression_topk`` clamped to ``[1, chunk elements]``. With
    ``k >= chunk elements`` every coefficient is sent, the momentum is emptied at
    every step and DeMo reduces to signSGD on the mean gradient.

    Note that the aggregate ``A`` divides by the number of *senders* of each
    coefficient, not by the number of workers. Without weight decay every update of
    every parameter element is ``-lr``, ``0`` or ``+lr``.

    Use:
        ``step()`` runs ``encode()`` (local phase), the exchange and ``apply()``.
        The exchange is ``gather_fn(payload)`` if given, else ``all_gather`` over
        the default ``torch.distributed`` group if it is initialized, else nothing
        (single worker). Simulators can call ``encode()`` on every worker, stack
        the payloads (``gathered[j] = torch.stack([p[j] for p in payloads])``)
        and call ``apply(gathered)`` on every worker; workers with identical
        parameters stay bitwise identical.

    Payload layout:
        Parameters (with ``requires_grad`` and at least one element, in
        ``param_groups`` order) are grouped by *geometry*: chunk shape, ``k``,
        ``alpha``, dtype and device, in order of first appearance. For every
        geometry ``g`` the payload holds two tensors, ``[indices_g, values_g]``:
        ``indices_g`` of shape ``[N_g, k_g]`` (int64, or ``index_dtype``) with the
        flat positions, inside each chunk, of the selected DCT coefficients, and
        ``values_g`` of shape ``[N_g, k_g]`` (parameter dtype, or ``value_dtype``)
        with their values, or ``[N_g, ceil(k_g / 8)]`` ``uint8`` sign bits when
        ``sign_values`` is set. ``N_g`` counts the chunks of all parameters of the
        geometry, parameter after parameter, each chunk-major. Bytes sent per step:
        ``sum_g N_g * k_g * (index bytes + value bytes)`` (with ``sign_values``,
        ``sum_g N_g * (k_g * index bytes + ceil(k_g / 8))``).

    Options beyond the reference (all off by default):
        * ``index_dtype``: ``"auto"`` sends indices in the narrowest integer dtype
          that holds the chunk's element count (``uint8`` up to 256 elements, i.e.
          16x16 chunks, ``int16`` up to 32768, ...), or give an integer dtype.
        * ``value_dtype``: send values as e.g. ``torch.bfloat16``. The error
          feedback then removes the *rounded* values, so rounding error stays in
          the local momentum instead of being lost.
        * ``sign_values``: send one bit per value (as Psyche does). Receivers use
          ``+1`` / ``-1`` as the value of every received coefficient (then average
          over senders as usual); the sender's error feedback removes the full
          precision values it selected (its momentum in those components counts as
          delivered).
        * ``alpha < 1``: subtract only ``alpha`` times the transmitted components
          from the momentum (damped momentum subtraction, for the variant of the
          revised paper, arXiv v2); ``alpha = 1`` is the reference.

    Implementation:
        All parameters of a geometry are processed together: their momenta are
        copied chunk-major into one ``[N_g, *chunk]`` buffer, which gets one batched
        DCT (matmuls with a cached basis), one top-k and one decode; only views and
        ``torch._foreach_*`` calls touch individual parameters. Sparse coefficient
        sets are decoded directly when that is cheaper than a dense inverse DCT.
        Aggregation adds workers one after the other, so every worker that applies
        the same gathered payload to the same parameters computes bitwise the same
        update, on CPU and GPU alike. Gathered indices are trusted: they must lie in
        ``[0, chunk elements)`` and be distinct within a worker's row.

    Args:
        params: Parameters or parameter groups. Per-group keys: ``lr``,
            ``weight_decay``, ``compression_decay``, ``compression_topk``,
            ``compression_chunk`` and ``alpha``.
        lr: Learning rate (>= 0): the size of every sign step, and the scale of
            gradients in the momentum.
        compression_decay: Momentum decay in ``[0, 1)``.
        compression_topk: Coefficients sent per chunk (>= 1).
        compression_chunk: Target chunk length per chunked dimension (>= 1).
        weight_decay: Decoupled weight decay (>= 0), multiplied by ``lr``.
        gather_fn: Optional exchange function, see ``GatherFn``.
        index_dtype: ``None`` (int64), ``"auto"`` or an integer dtype.
        value_dtype: ``None`` (parameter dtype) or a floating dtype.
        sign_values: Send 1-bit signs instead of values.
        alpha: Error-feedback scale in ``[0, 1]``.

    Raises:
        ValueError: On an invalid hyperparameter (one-line message).

    State:
        ``self.state[p]`` holds ``delta`` (the momentum, shaped like ``p``) and
        ``step``; ``state_dict()`` / ``load_state_dict()`` round-trip it. A parameter
        whose ``.grad`` is ``None`` counts as having a zero gradient (its momentum
        still decays and is still sent), so the payload layout never changes.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        compression_decay: float = 0.999,
        compression_topk: int = 32,
        compression_chunk: int = 64,
        weight_decay: float = 0.0,
        gather_fn: GatherFn | None = None,
        index_dtype: torch.dtype | str | None = None,
        value_dtype: torch.dtype | str | None = None,
        sign_values: bool = False,
        alpha: float = 1.0,
    ) -> None:
        _check_hparams(
            lr, compression_decay, compression_topk, compression_chunk, weight_decay, alpha
        )
        if gather_fn is not None and not callable(gather_fn):
            raise ValueError(f"Invalid gather_fn (must be callable or None): {gather_fn!r}")
        if isinstance(index_dtype, str) and index_dtype != "auto":
            index_dtype = _dtype_named(index_dtype)
        if isinstance(value_dtype, str):
            value_dtype = _dtype_named(value_dtype)
        if not (index_dtype is None or index_dtype == "auto" or index_dtype in _INDEX_DTYPES):
            raise ValueError(f"Invalid index_dtype (None, 'auto' or an int dtype): {index_dtype}")
        if isinstance(index_dtype, torch.dtype):
            largest = compression_chunk**2 - 1  # a 2-D chunk's last coefficient
            if torch.iinfo(index_dtype).max < largest:
                raise ValueError(
                    f"Invalid index_dtype {index_dtype} for compression_chunk={compression_chunk}:"
                    f" indices reach {largest}; use 'auto' or a wider dtype"
                )
        if not (value_dtype is None or value_dtype in _VALUE_DTYPES):
            raise ValueError(f"Invalid value_dtype (None or a float dtype): {value_dtype}")
        if not isinstance(sign_values, bool):
            raise ValueError(f"Invalid sign_values (must be a bool): {sign_values!r}")
        if sign_values and value_dtype is not None:
            raise ValueError("value_dtype has no effect with sign_values=True; pass only one")
        defaults = {
            "lr": lr,
            "compression_decay": compression_decay,
            "compression_topk": compression_topk,
            "compression_chunk": compression_chunk,
            "weight_decay": weight_decay,
            "alpha": alpha,
        }
        super().__init__(params, defaults)
        self.gather_fn = gather_fn
        self.index_dtype = index_dtype
        self.value_dtype = value_dtype
        self.sign_values = sign_values
        self._layout_key: tuple[Any, ...] | None = None
        self._layout: _Layout | None = None

    # ------------------------------------------------------------------ layout

    def _get_layout(self) -> _Layout:
        key: list[Any] = []
        for group in self.param_groups:
            key.append((group["compression_chunk"], group["compression_topk"], group["alpha"]))
            key.extend(
                (id(p), p.requires_grad, p.shape, p.dtype, p.device, p.is_contiguous())
                for p in group["params"]
            )
        frozen = tuple(key)
        if self._layout is None or frozen != self._layout_key:
            self._layout = self._build_layout()
            self._layout_key = frozen
        return self._layout

    def _build_layout(self) -> _Layout:
        geometries: dict[tuple[Any, ...], _Geometry] = {}
        by_group: list[list[Tensor]] = []
        for gi, group in enumerate(self.param_groups):
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
                    index_dtype = self._resolve_index_dtype(n_coeffs)
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

    def _resolve_index_dtype(self, n_coeffs: int) -> torch.dtype:
        if self.index_dtype is None:
            return torch.int64
        if self.index_dtype == "auto":
            return compact_index_dtype(n_coeffs)
        dtype = self.index_dtype
        assert isinstance(dtype, torch.dtype)
        if torch.iinfo(dtype).max < n_coeffs - 1:
            raise ValueError(f"index_dtype {dtype} cannot hold indices up to {n_coeffs - 1}")
        return dtype

    def _deltas(self, params: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for p in params:
            state = self.state[p]
            delta = state.get("delta")
            if delta is None:
                delta = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["delta"] = delta
                state["step"] = 0
            elif not delta.is_contiguous():
                delta = state["delta"] = delta.contiguous()
            out.append(delta)
        return out

    # ------------------------------------------------------------------ phases

    @torch.no_grad()
    def encode(self) -> list[Tensor]:
        """Run the local phase for every parameter and return the payload to send.

        Applies weight decay, updates the momentum with the current gradients, takes
        the chunked DCT, selects the top-k coefficients and removes them from the
        momentum (error feedback). See the class docstring for the payload layout.

        Returns:
            ``[indices_0, values_0, indices_1, values_1, ...]``, one pair per geometry.
        """
        layout = self._get_layout()
        for group, params in zip(self.param_groups, layout.by_group, strict=True):
            if not params:
                continue
            lr = float(group["lr"])
            deltas = self._deltas(params)
            if group["weight_decay"] != 0.0:
                torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
            torch._foreach_mul_(deltas, group["compression_decay"])
            pairs = [(d, p.grad) for d, p in zip(deltas, params, strict=True) if p.grad is not None]
            if pairs:
                if any(g.is_sparse for _, g in pairs):
                    raise RuntimeError("DeMo does not support sparse gradients")
                torch._foreach_add_([d for d, _ in pairs], [g for _, g in pairs], alpha=lr)
            for p in params:
                self.state[p]["step"] += 1

        payload: list[Tensor] = []
        for geo in layout.geometries:
            ndim = len(geo.chunk)
            n_rows = geo.n_chunks
            deltas = geo.tensor_views(self._deltas([m.param for m in geo.members]))
            buf = torch.empty((n_rows, *geo.chunk), dtype=geo.dtype, device=geo.device)
            torch._foreach_copy_(geo.piece_views(buf), deltas)
            coeffs = dct_nd(buf, ndim).reshape(n_rows, geo.n_coeffs)
            idx = coeffs.abs().topk(geo.k, dim=1, sorted=False).indices
            val = coeffs.gather(1, idx)
            if self.sign_values:
                wire_val = pack_signs(val)
                kept = val
            elif self.value_dtype is not None and self.value_dtype != val.dtype:
                wire_val = val.to(self.value_dtype)
                kept = wire_val.to(val.dtype)
            else:
                wire_val = kept = val
            if geo.alpha != 1.0:
                kept = kept * geo.alpha
            if _sparse_is_cheaper(geo.k, geo.chunk):
                sent_dense = sparse_idct(idx, kept, geo.chunk)
            else:
                sent = torch.zeros_like(coeffs).scatter_(1, idx, kept)
                sent_dense = idct_nd(sent.view(n_rows, *geo.chunk), ndim)
            torch._foreach_sub_(deltas, geo.piece_views(sent_dense))
            payload.append(idx if geo.index_dtype == torch.int64 else idx.to(geo.index_dtype))
            payload.append(wire_val)
        return payload

    @torch.no_grad()
    def apply(self, gathered: Sequence[Tensor]) -> None:
        """Aggregate the gathered payloads and take the sign step on every parameter.

        Args:
            gathered: ``gathered[j]`` is payload tensor ``j`` of every worker stacked
                along a new leading dimension (size ``n_workers``), in worker order.

        Raises:
            ValueError: If ``gathered`` does not match this optimizer's payload layout.
        """
        layout = self._get_layout()
        if len(gathered) != 2 * len(layout.geometries):
            raise ValueError(
                f"expected {2 * len(layout.geometries)} gathered tensors, got {len(gathered)}"
            )
        for gi, geo in enumerate(layout.geometries):
            n_rows = geo.n_chunks
            idx_all, val_all = gathered[2 * gi], gathered[2 * gi + 1]
            val_width = (geo.k + 7) // 8 if self.sign_values else geo.k
            if (
                idx_all.dim() != 3
                or tuple(idx_all.shape[1:]) != (n_rows, geo.k)
                or tuple(val_all.shape) != (idx_all.shape[0], n_rows, val_width)
            ):
                raise ValueError(
                    f"gathered pair {gi} has shapes {tuple(idx_all.shape)} and "
                    f"{tuple(val_all.shape)}; expected [W, {n_rows}, {geo.k}] and "
                    f"[W, {n_rows}, {val_width}]"
                )
            indices = idx_all.to(device=geo.device, dtype=torch.int64)
            if self.sign_values:
                values = unpack_signs(val_all.to(geo.device), geo.k, geo.dtype)
            else:
                values = val_all.to(device=geo.device, dtype=geo.dtype)
            update = decode_aggregate(indices, values, geo.chunk).sign_()
            pieces = geo.piece_views(update)
            targets = geo.tensor_views([m.param for m in geo.members])
            for group_index, positions in geo.by_group().items():
                lr = float(self.param_groups[group_index]["lr"])
                torch._foreach_add_(
                    [targets[i] for i in positions], [pieces[i] for i in positions], alpha=-lr
                )

    def exchange(self, payload: list[Tensor]) -> list[Tensor]:
        """Exchange a payload with all workers (step 7 of the algorithm).

        Uses ``gather_fn`` if set, else ``torch.distributed.all_gather`` when a default
        process group is initialized, else returns the payload alone (one worker).
        """
        if self.gather_fn is not None:
            return list(self.gather_fn(payload))
        if dist.is_available() and dist.is_initialized():
            return all_gather_payload(payload)
        return [t.unsqueeze(0) for t in payload]

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one DeMo step: ``apply(exchange(encode()))``.

        Args:
            closure: Optional closure that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.apply(self.exchange(self.encode()))
        return loss

    @staticmethod
    def payload_nbytes(payload: Iterable[Tensor]) -> int:
        """Return the bytes a payload occupies on the wire (see :func:`payload_nbytes`)."""
        return payload_nbytes(payload)
