"""SparseLoCo's codec: chunk-wise top-k with low-bit statistical quantization.

SparseLoCo (Sarfi, Thérien, Lidin, Belilovsky 2025, "Communication Efficient LLM Pre-training
with SparseLoCo", arXiv 2508.15706) replaces DiLoCo's outer momentum by a per-worker error
feedback accumulator and sends a sparse, 2-bit version of it. Per round ``t`` and worker ``r``:

    Delta_r   = theta^(t-1) - theta_r^(t)            pseudo-gradient after H inner AdamW steps
    e_r       <- beta e_r + Delta_r                  error feedback (decay beta)
    D_r       = Q(TopK_chunk(e_r))                   k largest |e| of every chunk, quantized
    e_r       <- e_r - D_r                           what was not sent stays local
    D         = (1 / R) sum_r D_r                    plain mean over the R workers
    theta^(t) = theta^(t-1) - alpha D                outer SGD, no momentum (alpha = 1)

:class:`ChunkTopK` is ``Q(TopK_chunk(.))``; the error feedback is
:class:`diloco.exchange.codecs.ErrorFeedback` (``error_feedback: true, ef_decay: beta`` in the
config), the mean is the pipeline's ``Mean`` aggregator and the outer step is
``torch.optim.SGD(lr=1, momentum=0)`` (``conf/algorithm/sparseloco.yaml``).

Quantizer (the statistical quantizer of the reference code, one-covenant/SparseLoCo, also in
tplr-ai/templar ``TopKCompressor``): for the ``k`` kept values ``v`` of one group, with
``L = 2**bits`` levels and ``range = range_sigmas``::

    shift = mean(v);  c = v - shift;  std = sqrt(sum(c**2) / (k - 1))
    scale = range * std / L           (1 if that is 0 or not finite)
    q     = clamp(round(c / scale + L / 2), 0, L - 1)          (bits-wide codes)
    lut_b = mean of c over {q == b}   (0 for an empty bin)
    v_hat = lut_q + shift

so each code decodes to the mean of its bin (the group's sum is kept exactly) and a value inside
the clipping range is off by at most ``scale``. On the wire per group: ``shift`` and the ``L``
bin means in fp32 (``lookup=false``: ``shift`` and ``scale`` only, decoding to the bin centre
``(q - L / 2) scale + shift``).

Chunking (a departure, see below): each payload row ``[P]`` is cut into ``C = ceil(P / chunk)``
chunks of ``chunk`` consecutive elements (the last one zero-padded); each chunk keeps its ``k``
largest magnitudes, sends their chunk-local indices bit-packed with ``index_bits(chunk)`` bits
(12 for 4096) and quantizes them as one group. One worker sends, with ``b = bits`` and
``s = L + 1`` (``lookup``) or ``2`` statistics per chunk::

    ceil(C k b / 8)  +  ceil(C k index_bits(chunk) / 8)  +  4 s C      bytes

Departures from the paper and its code:

- Chunks are 1-D runs of ``chunk`` elements of the flat payload row, not 64 x 64 tiles of each
  parameter tensor (the codec sees ``[n, P]`` rows, not the tensors). With the default
  ``chunk=4096, k=64`` the density (1.56 %) and the index width (12 bits) are the reference's.
- The quantizer's statistics are per chunk; the reference computes one ``shift`` and lookup
  table per parameter tensor over all its kept values (again: no tensor boundaries here).
- The reference averages, at each index, over the workers that sent it (``scatter_reduce``
  ``mean``); here the aggregate is the paper's ``(1/R) sum_r`` (the pipeline's mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diloco.config import ConfigError
from diloco.exchange.codec_base import Codec, Encoded, _rows
from diloco.exchange.sparse import index_bits, pack_bits, unpack_bits

__all__ = ["ChunkTopK", "quantize_groups", "dequantize_groups"]


def quantize_groups(
    v: Tensor, bits: int, range_sigmas: float, lookup: bool = True
) -> tuple[Tensor, Tensor]:
    """Statistical quantization of each group ``v[..., :]`` -> codes (int64) and stats (fp32).

    ``stats[..., 0]`` is the shift (group mean); then the ``2**bits`` bin means of the centred
    values (``lookup``), or the scale (not ``lookup``).
    """
    levels = 2**bits
    m = v.shape[-1]
    shift = v.mean(-1, keepdim=True)
    c = v - shift
    std = (c.square().sum(-1, keepdim=True) / max(m - 1, 1)).sqrt()
    scale = range_sigmas * std / levels
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    q = (c / scale + levels // 2).round().clamp(0, levels - 1).to(torch.int64)
    if not lookup:
        return q, torch.cat([shift, scale], -1)
    sums = torch.zeros(*v.shape[:-1], levels, dtype=v.dtype, device=v.device)
    sums.scatter_add_(-1, q, c)
    counts = torch.zeros_like(sums).scatter_add_(-1, q, torch.ones_like(c))
    lut = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    return q, torch.cat([shift, lut], -1)


def dequantize_groups(q: Tensor, stats: Tensor, bits: int, lookup: bool = True) -> Tensor:
    """Inverse of :func:`quantize_groups`: ``lut[q] + shift`` (or ``(q - L/2) scale + shift``)."""
    shift = stats[..., :1]
    if lookup:
        return stats[..., 1:].gather(-1, q) + shift
    return (q - 2**bits // 2).to(stats.dtype) * stats[..., 1:2] + shift


class ChunkTopK(Codec):
    """SparseLoCo's ``Q(TopK(.))``: top-``k`` of every ``chunk`` elements, ``bits``-bit values.

    See the module docstring for the rule (arXiv 2508.15706), the wire format, the byte count
    and the departures (1-D chunks of the flat row; statistics per chunk). Wrap it in error
    feedback (``error_feedback: true``, ``ef_decay: 0.95``) for SparseLoCo itself.
    """

    name = "chunk_topk"

    @dataclass
    class Config(Codec.Config):
        """``k`` of every ``chunk`` elements kept; values in ``bits`` bits (2, 4 or 8)."""

        chunk: int = field(default=4096, metadata={"ge": 1})
        k: int = field(default=64, metadata={"ge": 1})
        bits: Literal[2, 4, 8] = 2
        range_sigmas: float = field(default=6.0, metadata={"gt": 0.0})
        lookup: bool = True

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__(cfg)
        cfg = self.cfg
        if cfg.bits not in (2, 4, 8):
            raise ConfigError(f"codec.bits={cfg.bits}", "must be 2, 4 or 8")
        self.chunk, self.k, self.bits = cfg.chunk, min(cfg.k, cfg.chunk), cfg.bits
        self.range_sigmas, self.lookup = cfg.range_sigmas, cfg.lookup
        self.nstats = 2**self.bits + 1 if self.lookup else 2

    def num_chunks(self, p: int) -> int:
        """``ceil(P / chunk)``."""
        return -(-p // self.chunk)

    def nbytes(self, p: int) -> int:
        """Bytes one worker sends for a row of ``P`` (the formula of the module docstring)."""
        m = self.num_chunks(p) * self.k
        stats = 4 * self.nstats * self.num_chunks(p)
        return math.ceil(m * self.bits / 8) + math.ceil(m * index_bits(self.chunk) / 8) + stats

    def encode(self, rows: Tensor) -> Encoded:
        """Top-``k`` per chunk (indices sorted), quantize each chunk's values, pack both."""
        x = _rows(rows)
        n, p = x.shape
        c = self.num_chunks(p)
        chunks = F.pad(x, (0, c * self.chunk - p)).view(n, c, self.chunk)
        idx = chunks.abs().topk(self.k, dim=-1, sorted=False).indices.sort(-1).values
        kept = chunks.gather(-1, idx)
        q, stats = quantize_groups(kept, self.bits, self.range_sigmas, self.lookup)
        return Encoded(
            (n, p),
            pack_bits(q.reshape(n, -1), self.bits),
            indices=pack_bits(idx.reshape(n, -1), index_bits(self.chunk)),
            scales=stats.reshape(n, -1),
        )

    def decode(self, enc: Encoded) -> Tensor:
        """Dequantize, scatter into zero chunks, drop the padding."""
        assert enc.indices is not None and enc.scales is not None
        n, p = enc.shape
        c, k = self.num_chunks(p), self.k
        q = unpack_bits(enc.values, self.bits, c * k).view(n, c, k)
        idx = unpack_bits(enc.indices, index_bits(self.chunk), c * k).view(n, c, k)
        stats = enc.scales.float().view(n, c, self.nstats)
        vals = dequantize_groups(q, stats, self.bits, self.lookup)
        out = torch.zeros(n, c, self.chunk, device=vals.device)
        return out.scatter_(-1, idx, vals).view(n, -1)[:, :p]
