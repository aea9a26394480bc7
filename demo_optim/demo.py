"""DeMo: Decoupled Momentum Optimization (Peng, Quesnelle, Kingma 2024).

See :class:`DeMo` for the algorithm, the options and the payload layout. Payload
helpers live in :mod:`demo_optim.payload`, the parameter layout in
:mod:`demo_optim.layout`; their public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from demo_optim.dct import dct_nd, idct_nd, sparse_idct
from demo_optim.layout import _check_hparams, _Layout, build_layout
from demo_optim.payload import (
    _INDEX_DTYPES,
    _VALUE_DTYPES,
    GatherFn,
    _dtype_named,
    _sparse_is_cheaper,
    all_gather_payload,
    compact_index_dtype,
    decode_aggregate,
    pack_signs,
    payload_nbytes,
    unpack_signs,
)

__all__ = ["DeMo"]


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

    Reproducibility:
        The sign step turns any float difference in the aggregate into a step of
        ``2 * lr`` once it crosses zero, and the error feedback keeps such differences
        in the momentum, so runs drift apart from the first differing bit. A run is
        bitwise repeatable, and a simulation equal to the same workers over ranks,
        only when every worker computes the same gradients: on CPU that needs the same
        ``torch.get_num_threads()`` in every process (PyTorch's LayerNorm weight
        gradient, for one, sums in a thread-count dependent order; torchrun starts
        every rank with ``OMP_NUM_THREADS=1``). The optimizer's own encode and apply
        do not depend on how many workers a process hosts or on its rank.

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
        return build_layout(self.param_groups, self._resolve_index_dtype)

    def index_bounds(self) -> list[int | None]:
        """Per payload tensor: the exclusive upper bound of its indices (None for values).

        For checking payloads received from untrusted peers before :meth:`apply`.
        """
        return [b for geo in self._get_layout().geometries for b in (geo.n_coeffs, None)]

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
        return DeMo.encode_many([self])[0]

    def _local_momentum(self) -> None:
        """Decoupled weight decay and ``delta = decay * delta + lr * grad``, per group."""
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

    @staticmethod
    @torch.no_grad()
    def encode_many(optimizers: Sequence[DeMo]) -> list[list[Tensor]]:
        """:meth:`encode` of several optimizers of one layout (simulated workers) at once.

        Every geometry's chunks of all of them go through one DCT, one top-k and one
        error-feedback decode (``[W * N_g, *chunk]``), instead of one per optimizer.
        Returns each optimizer's payload; the momenta end as after separate ``encode()``
        calls, to the rounding of the larger matmuls (bitwise with one thread, tested).

        Raises:
            ValueError: If the optimizers' layouts or wire options differ.
        """
        first = optimizers[0]
        layouts = [opt._get_layout() for opt in optimizers]

        def shape(layout: _Layout) -> list[tuple[Any, ...]]:
            return [
                (g.chunk, g.k, g.n_chunks, g.dtype, g.device, g.alpha, g.index_dtype)
                for g in layout.geometries
            ]

        for opt, layout in zip(optimizers, layouts, strict=True):
            wire = (opt.sign_values, opt.value_dtype)
            if wire != (first.sign_values, first.value_dtype) or shape(layout) != shape(layouts[0]):
                raise ValueError("encode_many needs optimizers of one layout and wire format")
        for opt in optimizers:
            opt._local_momentum()

        w = len(optimizers)
        payloads: list[list[Tensor]] = [[] for _ in optimizers]
        for gi, geo in enumerate(layouts[0].geometries):
            ndim, n = len(geo.chunk), geo.n_chunks
            buf = torch.empty((w * n, *geo.chunk), dtype=geo.dtype, device=geo.device)
            deltas = []
            for j, (opt, layout) in enumerate(zip(optimizers, layouts, strict=True)):
                g = layout.geometries[gi]
                d = g.tensor_views(opt._deltas([m.param for m in g.members]))
                torch._foreach_copy_(g.piece_views(buf[j * n : (j + 1) * n]), d)
                deltas.append(d)
            coeffs = dct_nd(buf, ndim).reshape(w * n, geo.n_coeffs)
            idx = coeffs.abs().topk(geo.k, dim=1, sorted=False).indices
            val = coeffs.gather(1, idx)
            if first.sign_values:
                wire_val = pack_signs(val)
                kept = val
            elif first.value_dtype is not None and first.value_dtype != val.dtype:
                wire_val = val.to(first.value_dtype)
                kept = wire_val.to(val.dtype)
            else:
                wire_val = kept = val
            if geo.alpha != 1.0:
                kept = kept * geo.alpha
            if _sparse_is_cheaper(geo.k, geo.chunk):
                sent_dense = sparse_idct(idx, kept, geo.chunk)
            else:
                sent = torch.zeros_like(coeffs).scatter_(1, idx, kept)
                sent_dense = idct_nd(sent.view(w * n, *geo.chunk), ndim)
            wire_idx = idx if geo.index_dtype == torch.int64 else idx.to(geo.index_dtype)
            for j, layout in enumerate(layouts):
                rows = slice(j * n, (j + 1) * n)
                g = layout.geometries[gi]
                torch._foreach_sub_(deltas[j], g.piece_views(sent_dense[rows]))
                payloads[j] += [wire_idx[rows], wire_val[rows]]
        return payloads

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
