"""Base of the payload codecs: the :class:`Encoded` wire tensors and the :class:`Codec` API.

Split out of :mod:`diloco.exchange.codecs` (which re-exports every name here) so that the dense
codecs there and the sparsifiers in :mod:`diloco.exchange.sparse` share one base without a
circular import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Encoded:
    """Wire tensors of one encode, each ``[n, ...]``, plus the original ``shape`` ``(n, P)``."""

    shape: tuple[int, int]
    values: Tensor
    indices: Tensor | None = None
    scales: Tensor | None = None

    def nbytes_per_worker(self) -> int:
        """Bytes one worker sends: ``numel * element_size`` of its tensors."""
        return nbytes_per_worker(self)


def nbytes_per_worker(enc: Encoded) -> int:
    """Bytes of one worker's share of ``enc`` (values, indices, scales summed, divided by n)."""
    parts = (t for t in (enc.values, enc.indices, enc.scales) if t is not None)
    return sum(t.numel() * t.element_size() for t in parts) // max(enc.shape[0], 1)


def wire_nbytes(codec: Codec, p: int) -> int:
    """Bytes one worker sends for a payload row of ``p`` entries, at any ``p``.

    The codec's own :meth:`Codec.encode` of a row on the meta device (shapes and dtypes, no
    memory, no arithmetic), counted by :func:`nbytes_per_worker`: the bytes the exchange
    charges for a real row of that length, padding and bit packing included.
    """
    return nbytes_per_worker(codec.encode(torch.empty(1, p, device="meta")))


def _rows(rows: Tensor) -> Tensor:
    if rows.dim() != 2:
        raise ValueError(f"codecs take payload rows [n, P], got shape {tuple(rows.shape)}")
    return rows.float()


class Codec:
    """Base codec: ``encode`` rows ``[n, P]`` -> :class:`Encoded` -> ``decode`` fp32 rows.

    Built from a ``codec`` config node by ``_target_``; every codec's ``Config`` extends
    :class:`Codec.Config`, whose keys ask for error feedback around the codec (applied by
    :func:`diloco.exchange.codecs.make_codec`). ``ring_summable``: a ring all-reduce can sum
    the payload at the encoded width (re-quantizing per hop), so a plain mean needs no gather.
    """

    name = "codec"
    ring_summable = False

    @dataclass
    class Config:
        """Error feedback around the codec (``ef_decay``: residual decay per round)."""

        error_feedback: bool = False
        ef_decay: float = field(default=1.0, metadata={"ge": 0.0, "le": 1.0})

    def __init__(self, cfg: Any = None) -> None:
        self.cfg: Any = cfg if cfg is not None else self.Config()

    def encode(self, rows: Tensor) -> Encoded:
        """Encode payload rows ``[n, P]``."""
        raise NotImplementedError

    def decode(self, enc: Encoded) -> Tensor:
        """Decode to fp32 rows of ``enc.shape``."""
        raise NotImplementedError

    def forger(self) -> Codec:
        """The codec a Byzantine worker encodes its forged rows with: this wire format.

        A codec that draws its support at random (``randk``) returns a deterministic one of
        the same size instead: the receiver cannot tell which entries a sender drew, so a
        forger picks them.
        """
        return self

    def state_dict(self) -> dict[str, Any]:
        """Random-generator state of stochastic codecs (empty otherwise)."""
        gen = getattr(self, "gen", None)
        return {"rng": gen.get_state()} if isinstance(gen, torch.Generator) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "rng" in state:
            self.gen.set_state(state["rng"])  # type: ignore[attr-defined]
