"""Payload codecs: quantize or sparsify worker rows in transit, and count the bytes produced.

A codec maps payload rows ``[n, P]`` (fp32, one row per worker) to an :class:`Encoded` that
holds the tensors that would go on the wire, each with a leading worker dim ``n``, and
:meth:`Codec.decode` maps it back to fp32 rows. Bytes are counted from the tensors actually
produced (:func:`nbytes_per_worker`), so padding and bit packing are charged exactly. With
``b = ceil(P / block)`` blocks, ``s`` bytes per scale (2 or 4), ``k`` kept values and
``w = max(1, bit_length(P - 1))`` bits per index, one worker sends:

    none         fp32 values                                4 P
    fp16, bf16   16-bit values                              2 P
    int8         int8 codes + one scale per block           P + s b
    int4         two 4-bit codes per uint8 + scales         ceil(P / 2) + s b
    sign         1 bit per element + one fp32 scale         ceil(P / 8) + 4
    topk, randk  fp32 values + bit-packed indices           4 k + ceil(k w / 8)
    dct_topk     same per chunk of c (C = ceil(P / c))      4 C k + ceil(C k w_c / 8)
    compose      sparsifier indices + value codec over k
    chunk_topk   SparseLoCo's codec (C k values of b bits,  ceil(C k b / 8) + ceil(C k w_c / 8)
                 12-bit indices for c = 4096, fp32 stats)    + 4 (2**b + 1) C; in
                                                             :mod:`diloco.exchange.sparseloco`

Indices are bit-packed LSB-first into ``uint8`` with the fewest bits that hold ``P - 1``
(``w_c`` bits for ``c - 1`` in ``dct_topk``); bit ``j`` of the packed stream is bit ``j % 8``
of byte ``j // 8``, as in :func:`demo_optim.pack_signs`. Random codecs draw from a seeded CPU
generator whose state is in :meth:`Codec.state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diloco.config import ConfigError, build
from diloco.exchange.codec_base import Codec, Encoded, _rows, nbytes_per_worker, wire_nbytes
from diloco.exchange.sparse import (
    DCTTopK,
    RandK,
    Sparsifier,
    TopK,
    index_bits,
    pack_bits,
    unpack_bits,
)

__all__ = [
    "BF16",
    "FP16",
    "Codec",
    "Compose",
    "DCTTopK",
    "Encoded",
    "ErrorFeedback",
    "Int4",
    "Int8",
    "NoCodec",
    "RandK",
    "Sign",
    "Sparsifier",
    "TopK",
    "make_codec",
    "index_bits",
    "nbytes_per_worker",
    "pack_bits",
    "unpack_bits",
    "wire_nbytes",
]


class NoCodec(Codec):
    """Identity: fp32 rows on the wire (4 bytes per element)."""

    name = "none"
    dtype = torch.float32
    ring_summable = True

    def encode(self, rows: Tensor) -> Encoded:
        """Cast to the wire dtype; fp16 values are clamped to its finite range."""
        x = _rows(rows)
        if self.dtype == torch.float16:
            x = x.clamp(-65504.0, 65504.0)
        return Encoded((x.shape[0], x.shape[1]), x.to(self.dtype))

    def decode(self, enc: Encoded) -> Tensor:
        """Cast back to fp32."""
        return enc.values.float()


class FP16(NoCodec):
    """IEEE half precision in transit: relative error <= 2**-11 in the normal range."""

    name = "fp16"
    dtype = torch.float16


class BF16(NoCodec):
    """bfloat16 in transit: relative error <= 2**-8 (fp32 exponent range, 8-bit mantissa)."""

    name = "bf16"
    dtype = torch.bfloat16


class Int8(Codec):
    """Symmetric per-block absmax quantization, as used for INTELLECT-1's int8 all-reduce.

    Rule per block of ``block`` elements: ``scale = absmax / qmax`` (stored in ``scale_dtype``,
    fp16 rounded *up* so codes stay within ``[-qmax, qmax]``), ``q = round(x / scale)``, and
    ``x_hat = q * scale``, so ``|x - x_hat| <= scale / 2``. Stochastic rounding uses
    ``floor(x / scale + u)``, ``u ~ U[0, 1)``: unbiased, ``|x - x_hat| < scale``.
    """

    name = "int8"
    bits = 8
    ring_summable = True

    @dataclass
    class Config(Codec.Config):
        """``block`` elements share a scale; stochastic rounding draws from ``seed``."""

        block: int = field(default=128, metadata={"ge": 1})
        scale_dtype: Literal["fp16", "fp32"] = "fp32"
        stochastic: bool = False
        seed: int = field(default=0, metadata={"ge": 0})

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg)
        cfg = self.cfg
        self.block, self.stochastic = cfg.block, cfg.stochastic
        self.scale_dtype = torch.float16 if cfg.scale_dtype == "fp16" else torch.float32
        self.qmax = 2 ** (self.bits - 1) - 1
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def _scales(self, absmax: Tensor) -> Tensor:
        scale = absmax / self.qmax
        if self.scale_dtype == torch.float32:
            return scale
        stored = scale.clamp(max=65504.0).half()
        up = torch.nextafter(stored, torch.full_like(stored, math.inf))
        return torch.where(stored.float() < scale, up, stored)

    def encode(self, rows: Tensor) -> Encoded:
        """Quantize each block of each row; the codes are cut back to ``P`` per row."""
        x = _rows(rows)
        n, p = x.shape
        nb = -(-p // self.block)
        blocks = F.pad(x, (0, nb * self.block - p)).view(n, nb, self.block)
        scales = self._scales(blocks.abs().amax(-1))
        v = blocks / scales.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]
        if self.stochastic and not v.is_meta:  # a meta row (wire size only) draws nothing
            v = torch.floor(v + torch.rand(v.shape, generator=self.gen).to(v.device))
        q = v.round().clamp(-self.qmax, self.qmax).view(n, -1)[:, :p]
        return Encoded((n, p), self._pack(q.to(torch.int64)), scales=scales)

    def _pack(self, q: Tensor) -> Tensor:
        return q.to(torch.int8)

    def _unpack(self, values: Tensor, p: int) -> Tensor:
        return values.float()

    def decode(self, enc: Encoded) -> Tensor:
        """``q * scale`` per block."""
        assert enc.scales is not None
        n, p = enc.shape
        nb = enc.scales.shape[1]
        q = F.pad(self._unpack(enc.values, p), (0, nb * self.block - p)).view(n, nb, -1)
        return (q * enc.scales.float()[..., None]).view(n, -1)[:, :p]


class Int4(Int8):
    """:class:`Int8`'s rule with ``qmax = 7``; codes ``q + 8`` packed two per ``uint8``."""

    name = "int4"
    bits = 4
    ring_summable = False

    def _pack(self, q: Tensor) -> Tensor:
        return pack_bits(q + 8, 4)

    def _unpack(self, values: Tensor, p: int) -> Tensor:
        return (unpack_bits(values, 4, p) - 8).float()


class Sign(Codec):
    """Scaled sign (EF-signSGD, Karimireddy et al. 2019, arXiv 1901.09847).

    ``x_hat = mean|x| * sign(x)`` per row, with ``sign(0) = +1``: one bit per element packed
    eight per ``uint8`` (set for negatives) plus one fp32 scale per row.
    """

    name = "sign"

    def encode(self, rows: Tensor) -> Encoded:
        """Pack sign bits and the per-row mean absolute value."""
        x = _rows(rows)
        bits = pack_bits((x < 0).to(torch.int64), 1)
        return Encoded((x.shape[0], x.shape[1]), bits, scales=x.abs().mean(1, keepdim=True))

    def decode(self, enc: Encoded) -> Tensor:
        """``scale * (+1 | -1)``."""
        assert enc.scales is not None
        neg = unpack_bits(enc.values, 1, enc.shape[1]).float()
        return (1.0 - 2.0 * neg) * enc.scales


class Compose(Codec):
    """Sparsify, then encode the kept ``[n, k]`` values with a value codec.

    E.g. global top-k with int4 values (``conf/codec/topk_int4.yaml``). On the wire:
    the sparsifier's indices plus the value codec's values and scales. Both are ``_target_``
    nodes (``sparsifier: {_target_: ...TopK, fraction: 0.02}``, ``values: {...Int4}``).
    """

    @dataclass
    class Config(Codec.Config):
        """The sparsifier and the codec of the kept values (default: fp32 values)."""

        sparsifier: dict[str, Any] = field(default_factory=dict)
        values: dict[str, Any] = field(
            default_factory=lambda: {"_target_": "diloco.exchange.codecs.NoCodec"}
        )

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg)
        sparsifier = build(self.cfg.sparsifier, "codec.sparsifier")
        if not isinstance(sparsifier, Sparsifier):
            raise ConfigError("codec.sparsifier", f"{sparsifier.name!r} is not a sparsifier")
        value_codec = build(self.cfg.values, "codec.values")
        self.sparsifier, self.value_codec = sparsifier, value_codec
        self.name = f"{sparsifier.name}+{value_codec.name}"

    def encode(self, rows: Tensor) -> Encoded:
        """Sparsify, then encode the ``[n, k]`` kept values."""
        s = self.sparsifier.encode(rows)
        v = self.value_codec.encode(s.values)
        if s.scales is not None or v.indices is not None:
            raise ValueError(f"cannot compose {self.name}: tensors would collide")
        return Encoded(s.shape, v.values, indices=s.indices, scales=v.scales)

    def decode(self, enc: Encoded) -> Tensor:
        """Decode the values, then scatter them."""
        n, p = enc.shape
        inner = Encoded((n, self.sparsifier.num_values(p)), enc.values, scales=enc.scales)
        vals = self.value_codec.decode(inner)
        return self.sparsifier.decode(Encoded(enc.shape, vals, indices=enc.indices))

    def state_dict(self) -> dict[str, Any]:
        """Both codecs' states."""
        return {"sparsifier": self.sparsifier.state_dict(), "values": self.value_codec.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore both codecs' states."""
        self.sparsifier.load_state_dict(state["sparsifier"])
        self.value_codec.load_state_dict(state["values"])


class ErrorFeedback(Codec):
    """Error feedback (Seide et al. 2014; Karimireddy et al. 2019) around any codec.

    Per worker: ``e = decay * residual + x``; send ``codec.encode(e)``; keep
    ``residual = e - decode(sent)``. With ``decay = 1`` nothing is lost: the sum of all
    decoded payloads plus the final residual equals the sum of all inputs.

    A worker that does not send this round (``sends`` false: it left, crashed, or ran no
    step under a deadline, so its payload has weight 0) keeps its residual exactly as it
    was: what its row would have sent is discarded by the weighted mean, so nothing of it
    may leave the residual. Nor is the residual decayed that round: it belongs to the
    rounds the worker took part in, and ``decay`` applies once per round it sends. Its row
    is still encoded (the collective moves ``[n, ...]`` tensors, and a random codec draws
    the same numbers either way), and the communicator still charges every worker the
    collective's bytes, the absent one included (the accounting models a fixed-size
    collective, not who took part).
    """

    def __init__(self, codec: Codec, decay: float = 1.0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"decay={decay}", "must be in [0, 1]")
        super().__init__(codec.cfg)
        self.ring_summable = codec.ring_summable  # the wire format is the inner codec's
        self.codec, self.decay = codec, decay
        self.name = f"ef({codec.name})"
        self.residual: Tensor | None = None

    def encode(self, rows: Tensor, sends: Tensor | None = None) -> Encoded:
        """Encode the residual-corrected rows and keep what was not sent.

        ``sends``: ``[n]`` bool, the rows whose payload counts this round (None: all);
        the others keep their residual unchanged (zero if they never sent).
        """
        x = _rows(rows)
        old = self.residual
        e = x if old is None else self.decay * old + x
        enc = self.codec.encode(e)
        residual = e - self.codec.decode(enc)
        if sends is not None and not bool(sends.all()):
            kept = torch.zeros_like(residual) if old is None else old
            residual = torch.where(sends.to(residual.device)[:, None], residual, kept)
        self.residual = residual
        return enc

    def decode(self, enc: Encoded) -> Tensor:
        """The wrapped codec's decode."""
        return self.codec.decode(enc)

    def state_dict(self) -> dict[str, Any]:
        """Residual ``[n, P]`` (absent before the first encode) and the codec's state."""
        state: dict[str, Any] = {"codec": self.codec.state_dict()}
        if self.residual is not None:
            state["residual"] = self.residual.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.codec.load_state_dict(state["codec"])
        r = state.get("residual")
        self.residual = None if r is None else r.clone()


def make_codec(node: dict[str, Any], key: str = "codec", feedback: bool = True) -> Codec:
    """The codec of a ``codec`` config node, wrapped in error feedback when it asks.

    ``feedback=False`` gives the bare wire format (what an attacker encodes its forged
    payloads with: it has no residual to carry).
    """
    codec = build(node, key)
    if not isinstance(codec, Codec):
        raise ConfigError(f"{key}._target_", f"{node['_target_']} is not a codec")
    wrap = feedback and codec.cfg.error_feedback
    return ErrorFeedback(codec, codec.cfg.ef_decay) if wrap else codec
