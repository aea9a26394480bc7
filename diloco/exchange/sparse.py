"""Sparsifying codecs and the index bit-packing they (and the low-bit dense codecs) use.

:class:`TopK`, :class:`RandK` and :class:`DCTTopK` keep a few fp32 values per row and send
their indices bit-packed LSB-first with :func:`pack_bits` (see :mod:`diloco.exchange.codecs` for
the byte counts). Every name here is re-exported from :mod:`diloco.exchange.codecs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from demo_optim.dct import dct_nd, idct_nd
from diloco.exchange.codec_base import Codec, Encoded, _rows


def index_bits(size: int) -> int:
    """Fewest bits that hold every index below ``size`` (at least 1)."""
    return max(1, (size - 1).bit_length())


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack codes ``[n, m]`` in ``[0, 2**bits)`` LSB-first into ``uint8 [n, ceil(m bits / 8)]``."""
    n, m = codes.shape
    if 8 % bits == 0:  # fast path: 8 / bits whole codes per byte
        per = 8 // bits
        grouped = F.pad(codes.to(torch.uint8), (0, -m % per)).view(n, -1, per)
        packed = grouped[:, :, 0].clone()
        for j in range(1, per):
            packed |= grouped[:, :, j] << (j * bits)
        return packed
    total = m * bits
    stream = torch.zeros(n, -(-total // 8) * 8, dtype=torch.uint8, device=codes.device)
    per_code = stream[:, :total].view(n, m, bits)
    for j in range(bits):
        per_code[:, :, j] = (codes >> j) & 1
    octets = stream.view(n, -1, 8)
    out = torch.zeros(octets.shape[:2], dtype=torch.uint8, device=codes.device)
    for j in range(8):
        out |= octets[:, :, j] << j
    return out


def unpack_bits(packed: Tensor, bits: int, m: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``int64 [n, m]`` codes."""
    n = packed.shape[0]
    if 8 % bits == 0:
        fields = [(packed >> (j * bits)) & ((1 << bits) - 1) for j in range(8 // bits)]
        return torch.stack(fields, -1).view(n, -1)[:, :m].to(torch.int64)
    stream = torch.empty(n, packed.shape[1], 8, dtype=torch.uint8, device=packed.device)
    for j in range(8):
        stream[:, :, j] = (packed >> j) & 1
    per_code = stream.view(n, -1)[:, : m * bits].view(n, m, bits)
    codes = torch.zeros(n, m, dtype=torch.int64, device=packed.device)
    for j in range(bits):
        codes |= per_code[:, :, j].to(torch.int64) << j
    return codes


class Sparsifier(Codec):
    """A codec that keeps :meth:`num_values` fp32 values per row and sends their indices."""

    def num_values(self, p: int) -> int:
        """Values kept per row of length ``p``."""
        raise NotImplementedError


class TopK(Sparsifier):
    """Per-row top-k by magnitude (Stich et al. 2018, arXiv 1809.07599).

    Kept entries are exact, the rest are zero. ``k``, when set, takes precedence over
    ``fraction`` (``k = max(1, ceil(fraction * P))``); both are capped at ``P``. Indices are
    sorted ascending and bit-packed with :func:`index_bits` ``(P)`` bits each.
    """

    name = "topk"

    @dataclass
    class Config(Codec.Config):
        """Keep ``k`` entries per row, or ``fraction`` of them when ``k`` is unset."""

        k: int | None = field(default=None, metadata={"ge": 1})
        fraction: float = field(default=0.01, metadata={"gt": 0.0, "le": 1.0})

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg)
        cfg = self.cfg
        self.k, self.fraction = cfg.k, cfg.fraction

    def num_values(self, p: int) -> int:
        """``min(P, k)`` or ``min(P, max(1, ceil(fraction P)))``."""
        return min(p, self.k if self.k is not None else max(1, math.ceil(self.fraction * p)))

    def _select(self, x: Tensor, k: int) -> Tensor:
        return x.abs().topk(k, dim=1, sorted=False).indices

    def encode(self, rows: Tensor) -> Encoded:
        """Select, gather the fp32 values and pack the indices."""
        x = _rows(rows)
        n, p = x.shape
        idx = self._select(x, self.num_values(p)).sort(dim=1).values
        return Encoded((n, p), x.gather(1, idx), indices=pack_bits(idx, index_bits(p)))

    def decode(self, enc: Encoded) -> Tensor:
        """Scatter the values into zeros."""
        assert enc.indices is not None
        n, p = enc.shape
        idx = unpack_bits(enc.indices, index_bits(p), enc.values.shape[1])
        out = torch.zeros(n, p, device=enc.values.device)
        return out.scatter_(1, idx, enc.values.float())


class RandK(TopK):
    """Per-row uniform random k of P entries (without replacement, seeded); unscaled."""

    name = "randk"

    @dataclass
    class Config(TopK.Config):
        """:class:`TopK`'s arguments plus the ``seed`` of the index draws."""

        seed: int = field(default=0, metadata={"ge": 0})

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)

    def _select(self, x: Tensor, k: int) -> Tensor:
        if x.is_meta:  # wire size only: the same k indices, no draw
            return super()._select(x, k)
        keys = torch.rand(x.shape, generator=self.gen).to(x.device)
        return keys.topk(k, dim=1, sorted=False).indices

    def forger(self) -> Codec:
        """A forger sends its own choice of k entries (the largest): :class:`TopK`, same size."""
        return TopK(TopK.Config(k=self.cfg.k, fraction=self.cfg.fraction))


class DCTTopK(Sparsifier):
    """DeMo's transform-and-select (Peng et al. 2024, arXiv 2411.19870) on payload rows.

    Each row is zero-padded to ``C = ceil(P / chunk)`` chunks, each chunk is mapped by the
    orthonormal DCT-II of :mod:`demo_optim.dct`, the ``k`` largest-magnitude coefficients of
    every chunk are sent (fp32 values, chunk-local indices of ``index_bits(chunk)`` bits) and
    decoding scatters them, applies the inverse DCT and drops the padding.
    """

    name = "dct_topk"

    @dataclass
    class Config(Codec.Config):
        """``chunk`` elements per DCT; ``k`` coefficients kept per chunk."""

        chunk: int = field(default=64, metadata={"ge": 1})
        k: int = field(default=8, metadata={"ge": 1})

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg)
        cfg = self.cfg
        self.chunk, self.k = cfg.chunk, min(cfg.k, cfg.chunk)

    def num_values(self, p: int) -> int:
        """``ceil(P / chunk) * k``."""
        return -(-p // self.chunk) * self.k

    def encode(self, rows: Tensor) -> Encoded:
        """DCT per chunk, keep the top ``k`` coefficients of each."""
        x = _rows(rows)
        n, p = x.shape
        c = -(-p // self.chunk)
        coeffs = dct_nd(F.pad(x, (0, c * self.chunk - p)).view(n, c, self.chunk), 1)
        idx = coeffs.abs().topk(self.k, dim=-1, sorted=False).indices.sort(-1).values
        vals = coeffs.gather(-1, idx).reshape(n, -1)
        return Encoded((n, p), vals, indices=pack_bits(idx.reshape(n, -1), index_bits(self.chunk)))

    def decode(self, enc: Encoded) -> Tensor:
        """Scatter coefficients, inverse DCT, drop padding."""
        assert enc.indices is not None
        n, p = enc.shape
        c = -(-p // self.chunk)
        idx = unpack_bits(enc.indices, index_bits(self.chunk), c * self.k).view(n, c, self.k)
        coeffs = torch.zeros(n, c, self.chunk, device=enc.values.device)
        coeffs.scatter_(-1, idx, enc.values.float().view(n, c, self.k))
        return idct_nd(coeffs, 1).reshape(n, -1)[:, :p]
