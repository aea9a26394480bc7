"""The exchange pipeline: what happens to payload rows between the local and the apply phase.

::

    rows [K, P] fp32          local phase of the algorithm (pseudo-gradients, gradients)
      -> attack               Byzantine workers rewrite their rows, honest rows in view
      -> validate             untrusted input: shape, dtype, finite; bad rows excluded, logged
      -> codec.encode         quantize / sparsify in transit (error feedback per worker)
      -> collective           all-reduce when the result is a plain mean of a dense payload
                              and nothing is to be inspected, else all-gather; bytes counted
                              from the encoding
      -> codec.decode         back to fp32
      -> aggregator           [n_ok, P] -> [P] in fp32 (mean, median, Krum, ...)

Algorithms never see any of this: they receive the ``[P]`` update. With the default
config (no codec, no attack, mean) the pipeline is exactly ``comm.all_reduce_mean(rows)``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diloco.adversary.aggregators import Aggregator, Mean, build_aggregator
from diloco.adversary.attacks import Attack, Malformed, build_attack
from diloco.adversary.validate import validate_payloads
from diloco.comm.base import Communicator
from diloco.comm.codecs import (
    Codec,
    Compose,
    ErrorFeedback,
    NoCodec,
    Sparsifier,
    build_codec,
)
from diloco.config import Config, ConfigError

log = logging.getLogger(__name__)


def _named(
    node: dict[str, Any], key: str, skip: tuple[str, ...] = ()
) -> tuple[str, dict[str, Any]]:
    if "name" not in node:
        raise ConfigError(f"{key}.name", "missing; pick one from conf/" + key)
    kwargs = {k: v for k, v in node.items() if k != "name" and k not in skip}
    return str(node["name"]), kwargs


def build_codec_node(node: dict[str, Any]) -> Codec:
    """``codec`` config node -> codec, wrapped in error feedback when asked."""
    name, kwargs = _named(node, "codec", ("error_feedback", "ef_decay"))
    codec = build_codec(name, **kwargs)
    if node.get("error_feedback", False):
        codec = ErrorFeedback(codec, decay=float(node.get("ef_decay", 1.0)))
    return codec


def build_attack_node(node: dict[str, Any], num_workers: int) -> tuple[Attack | None, torch.Tensor]:
    """``attack`` config node -> (attack or None, Byzantine mask ``[K]``).

    Byzantine workers are ``attack.ids`` when given, else the last ``attack.num_byzantine``.
    """
    name, kwargs = _named(node, "attack", ("num_byzantine", "ids"))
    ids = node.get("ids")
    f = int(node.get("num_byzantine", 0))
    if ids is None:
        if not 0 <= f < num_workers:
            raise ConfigError(f"attack.num_byzantine={f}", f"must be in [0, {num_workers - 1}]")
        ids = list(range(num_workers - f, num_workers))
    mask = torch.zeros(num_workers, dtype=torch.bool)
    for i in ids:
        if not 0 <= int(i) < num_workers:
            raise ConfigError("attack.ids", f"worker {i} is not in [0, {num_workers - 1}]")
        mask[int(i)] = True
    if name == "none" or not mask.any():
        return None, mask
    return build_attack(name, **kwargs), mask


def is_sparse(codec: Codec) -> bool:
    """True when the codec sends index/value pairs (summing them in a ring densifies them)."""
    if isinstance(codec, ErrorFeedback):
        return is_sparse(codec.codec)
    return isinstance(codec, Sparsifier | Compose)


@dataclass
class ExchangeStats:
    """What the last exchange did: rows excluded and why."""

    excluded: int = 0
    excluded_total: int = 0


class ExchangePipeline:
    """Attack, validation, codec, collective and aggregation around one communicator."""

    def __init__(
        self,
        comm: Communicator,
        codec: Callable[[], Codec] | None = None,
        aggregator: Aggregator | None = None,
        attack: Attack | None = None,
        byzantine: torch.Tensor | None = None,
        max_abs: float | None = None,
    ) -> None:
        self.comm = comm
        self.new_codec = codec or NoCodec
        self.codecs: dict[str, Codec] = {}
        self.aggregator = aggregator or Mean()
        self.attack = attack
        self.byzantine = (
            byzantine if byzantine is not None else torch.zeros(comm.num_workers, dtype=torch.bool)
        )
        self.max_abs = max_abs
        self.round = 0
        self.stats = ExchangeStats()

    @classmethod
    def from_config(cls, comm: Communicator, cfg: Config) -> ExchangePipeline:
        """Build from the ``codec``, ``aggregator``, ``attack`` and ``comm`` config nodes."""
        name, kwargs = _named(cfg.aggregator, "aggregator")
        atk, mask = build_attack_node(cfg.attack, comm.num_workers)
        agg = build_aggregator(name, **kwargs)
        build_codec_node(cfg.codec)  # validate now, not at the first exchange
        codec = functools.partial(build_codec_node, cfg.codec)
        return cls(comm, codec, agg, atk, mask, cfg.comm.max_abs)

    def plain_mean(self, codec: Codec) -> bool:
        """True when an all-reduce of the (encoded) rows gives the result.

        Otherwise the rows are all-gathered: robust aggregators and validation need every
        row, and sparse payloads are gathered as (index, value) pairs (as Templar does).
        """
        return self.attack is None and type(self.aggregator) is Mean and not is_sparse(codec)

    def codec(self, key: str = "") -> Codec:
        """The codec (and its error-feedback state) of payload stream ``key``."""
        if key not in self.codecs:
            self.codecs[key] = self.new_codec()
        return self.codecs[key]

    def __call__(self, rows: torch.Tensor, key: str = "") -> torch.Tensor:
        """Reduce payload rows ``[K, P]`` to one fp32 update ``[P]``.

        ``key`` names the payload stream (e.g. a Streaming DiLoCo fragment) so codec state
        such as error-feedback residuals is kept per stream.
        """
        payloads: list[Any] = list(rows)
        if self.attack is not None:
            if isinstance(self.attack, Malformed):
                payloads = self.attack.corrupt_payloads(payloads, self.byzantine, self.round)
            else:
                payloads = list(self.attack(rows, self.byzantine, self.round))
        ok, reasons = validate_payloads(
            payloads, shape=tuple(rows.shape[1:]), dtype=rows.dtype, max_abs=self.max_abs
        )
        self._note_excluded(reasons)
        clean = torch.stack([payloads[i] for i in range(len(payloads)) if i in ok]) if ok else None
        if clean is None:
            raise RuntimeError(f"round {self.round}: every payload was rejected")
        codec = self.codec(key)
        enc = codec.encode(self._full(clean, ok, rows))
        decoded = codec.decode(enc)
        nbytes = enc.nbytes_per_worker()
        if self.plain_mean(codec) and len(ok) == rows.shape[0]:
            return self.comm.all_reduce_mean(decoded, nbytes=nbytes)
        gathered = self.comm.all_gather(decoded, nbytes=nbytes)[ok]
        finite = torch.isfinite(gathered).all(dim=1)
        if not finite.all():
            bad = {ok[i]: f"worker {ok[i]}: non-finite after decoding" for i in range(len(ok))
                   if not finite[i]}  # fmt: skip
            self._note_excluded(bad)
            gathered = gathered[finite]
        return self.aggregator(gathered)

    def _full(self, clean: torch.Tensor, ok: list[int], rows: torch.Tensor) -> torch.Tensor:
        """Rows for every worker (excluded ones as zeros) so codec state stays per worker."""
        if len(ok) == rows.shape[0]:
            return clean
        full = torch.zeros_like(rows)
        full[ok] = clean
        return full

    def _note_excluded(self, reasons: dict[int, str]) -> None:
        self.stats.excluded = len(reasons)
        self.stats.excluded_total += len(reasons)
        for reason in reasons.values():
            log.warning("round %d: payload excluded: %s", self.round, reason)

    def state_dict(self) -> dict[str, Any]:
        """Codec (error-feedback residuals), aggregator and attack state."""
        parts: dict[str, Any] = {"stats": dict(vars(self.stats))}
        parts["codecs"] = {key: c.state_dict() for key, c in self.codecs.items()}
        parts["aggregator"] = self.aggregator.state_dict()
        if self.attack is not None:
            parts["attack"] = self.attack.state_dict()
        return parts

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for key, codec_state in state["codecs"].items():
            self.codec(key).load_state_dict(codec_state)
        self.aggregator.load_state_dict(state["aggregator"])
        self.stats = ExchangeStats(**state["stats"])
        if self.attack is not None:
            self.attack.load_state_dict(state["attack"])
