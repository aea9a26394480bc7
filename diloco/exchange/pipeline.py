"""The exchange: what happens to payload rows between the local and the apply phase.

::

    rows [K_local, P] fp32    local phase of the algorithm (pseudo-gradients, gradients)
      -> codec.encode         quantize / sparsify in transit (error feedback per worker)
      -> collective           all-reduce when the result is a plain mean of a payload a ring
                              can sum at its width (fp32, fp16, bf16, int8) and nothing is
                              to be inspected; else all-gather of the encoded tensors. Bytes
                              counted from the encoding
      -> attack               Byzantine payloads forged, with what the honest workers send
                              in view, then encoded with the same codec (the attacker picks
                              what to encode: under top-k it sends k values and k indices,
                              with the honest wire size), so what is aggregated is what the
                              wire could carry. Every process forges the same seeded rows
                              from the gathered ones, so simulated and distributed runs
                              agree. Only ``malformed`` acts on what arrives (a corrupt
                              message), after decoding
      -> validate             untrusted input: shape, dtype, finite, magnitude; a bad row is
                              excluded with a logged reason and the run goes on
      -> validator            optional scores -> weights (Gauntlet-style)
      -> aggregator           [n_ok, P] -> [P] in fp32 (mean, median, Krum, ...)

Algorithms never see any of this: they receive the ``[P]`` update. With the default config
(no codec, no attack, mean) the pipeline is exactly ``comm.all_reduce_mean(rows)``. State
(error-feedback residuals, a centered-clipping center, a stale attacker's history) is kept
per payload stream ``key``, so fragment-wise algorithms get one per fragment. A round in
which only some workers send (``senders``: the asynchronous schedule) pushes their payloads
to a server (:meth:`diloco.comm.InProcessComm.push`), each with its own codec state.

Every part is built once from its config node (``_target_``) by :meth:`ExchangePipeline.
from_config`, and every value is checked then, not at the first exchange.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diloco.adversary.aggregators import Aggregator, Mean
from diloco.adversary.attacks import Attack
from diloco.adversary.validate import validate_payloads
from diloco.comm.base import Communicator
from diloco.config import Config, ConfigError, build
from diloco.exchange.codecs import Codec, Encoded, ErrorFeedback, NoCodec, make_codec

log = logging.getLogger(__name__)


def gather_encoded(comm: Communicator, enc: Encoded, nbytes: float) -> Encoded:
    """All-gather an encoding's wire tensors (one collective) -> every worker's ``Encoded``."""
    names = [n for n in ("values", "indices", "scales") if getattr(enc, n) is not None]
    parts = comm.all_gather_parts([getattr(enc, n) for n in names], nbytes=nbytes)
    return Encoded((comm.num_workers, enc.shape[1]), **dict(zip(names, parts, strict=True)))


def all_reduces(codec: Codec, plain: bool) -> bool:
    """Whether an exchange is one all-reduce (else an all-gather of the encoded tensors).

    All-reduce when the result is a ``plain`` mean (no attack, validator or robust aggregator)
    of a payload a ring can sum at its encoded width (``codec.ring_summable``). The planner
    (:mod:`diloco.plan`) charges the same collective.
    """
    return plain and codec.ring_summable


def _push_encoded(comm: Communicator, enc: Encoded, senders: Sequence[int]) -> Encoded:
    """Push an encoding of the ``senders``' rows to the server; it answers with fp32 models."""
    names = [n for n in ("values", "indices", "scales") if getattr(enc, n) is not None]
    nbytes, pull = enc.nbytes_per_worker(), 4.0 * enc.shape[1]
    parts = comm.push([getattr(enc, n) for n in names], senders, nbytes, pull)
    return Encoded(enc.shape, **dict(zip(names, parts, strict=True)))


def decode_rows(
    codec: Codec, enc: Encoded, received: torch.Tensor | None
) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """Decode each received row of ``enc`` on its own: untrusted rows, some absent.

    Returns one fp32 row or None per worker, and a reason per row that is None: ``""`` for
    a row that did not arrive (absent, not excluded), else why it did not decode (e.g.
    bit-packed indices past the payload).
    """
    names = [n for n in ("values", "indices", "scales") if getattr(enc, n) is not None]
    rows: list[torch.Tensor | None] = []
    why: dict[int, str] = {}
    for i in range(enc.shape[0]):
        if received is not None and not bool(received[i]):
            rows.append(None)
            why[i] = ""
            continue
        one = Encoded((1, enc.shape[1]), **{n: getattr(enc, n)[i : i + 1] for n in names})
        try:
            rows.append(codec.decode(one)[0].float())
        except Exception as err:  # untrusted input must never crash the round
            rows.append(None)
            why[i] = f"worker {i}: does not decode ({type(err).__name__})"
    return rows, why


@dataclass
class ExchangeStats:
    """What the last exchange did: rows excluded, bytes of a forged payload."""

    excluded: int = 0
    excluded_total: int = 0
    forged_nbytes: int = 0  # bytes one Byzantine worker sent in the last forged round


class ExchangePipeline:
    """Codec, collective, attack, validation, validator and aggregation around a communicator.

    Args:
        comm: the communicator (counts bytes).
        codec, aggregator, attack: factories; one instance of each per payload stream.
        forge_codec: the wire format that forged payloads are encoded with
            (:meth:`~diloco.exchange.codec_base.Codec.forger` of ``codec`` without error
            feedback when built from the config; default here: ``codec``).
        byzantine: ``[K]`` mask of the workers the attack controls.
        max_abs: payload entries above this magnitude are malformed (None: no bound).
        validator: scores payloads into weights (None: none).
        round_of: the current round, for logs and attacks that start late.
    """

    def __init__(
        self,
        comm: Communicator,
        codec: Callable[[], Codec] = NoCodec,
        aggregator: Callable[[], Aggregator] = Mean,
        attack: Callable[[], Attack] | None = None,
        byzantine: torch.Tensor | None = None,
        max_abs: float | None = None,
        validator: Any = None,
        round_of: Callable[[], int] = lambda: 0,
        forge_codec: Callable[[], Codec] | None = None,
    ) -> None:
        self.comm = comm
        self.factories = {
            "codec": codec,
            "aggregator": aggregator,
            "attack": attack,
            "forge_codec": (forge_codec or codec) if attack is not None else None,
        }
        self.streams: dict[str, dict[str, Any]] = {}
        zeros = torch.zeros(comm.num_workers, dtype=torch.bool)
        self.byzantine = byzantine if byzantine is not None else zeros
        self.max_abs = max_abs
        self.validator = validator
        self.round_of = round_of
        self.stats = ExchangeStats()
        probe = self.stream("probe")  # what the per-stream parts are, for checks
        del self.streams["probe"]
        self.plain_mean = type(probe["aggregator"]) is Mean
        self.attack_forges = attack is not None
        self._plain_codec = type(probe["codec"]) is NoCodec

    @classmethod
    def from_config(
        cls,
        comm: Communicator,
        cfg: Config,
        attack: Attack,
        validator: Any = None,
        round_of: Callable[[], int] = lambda: 0,
    ) -> ExchangePipeline:
        """Build from the config; every value is checked now, not at the first exchange."""
        k = comm.num_workers
        codec = functools.partial(make_codec, cfg.codec)
        aggregator = functools.partial(build, cfg.aggregator, "aggregator")
        mask = attack.byzantine_mask(k)
        forging = None
        if attack.forges_payloads and mask.any():
            forging = functools.partial(build, cfg.attack, "attack")
        probe = torch.randn(k, 8, generator=torch.Generator().manual_seed(0))
        codec().encode(probe)
        probes: list[tuple[str, Callable[[], Any]]] = [("aggregator", lambda: aggregator()(probe))]
        if forging is not None:
            probes.append(("attack", lambda: forging().forge(probe, mask, 10**9)))
        for key, call in probes:
            try:
                call()
            except ValueError as err:  # e.g. f too large for K workers
                raise ConfigError(key, f"{err} (with workers.count={k})") from None
        max_abs = comm.cfg.max_abs

        def bare() -> Codec:
            return make_codec(cfg.codec, feedback=False).forger()

        return cls(comm, codec, aggregator, forging, mask, max_abs, validator, round_of, bare)

    def customized(self) -> list[str]:
        """The config groups not at their defaults (for methods that bypass the exchange)."""
        changed = {
            "codec": not self._plain_codec,
            "aggregator": not self.plain_mean,
            "attack": self.attack_forges,
            "validator": self.validator is not None,
        }
        return [key for key, c in changed.items() if c]

    def stream(self, key: str = "") -> dict[str, Any]:
        """Codec, aggregator and attack instances (and their state) of payload stream ``key``."""
        if key not in self.streams:
            self.streams[key] = {n: f() if f else None for n, f in self.factories.items()}
        return self.streams[key]

    def __call__(
        self,
        rows: torch.Tensor,
        key: str = "",
        weights: torch.Tensor | None = None,
        senders: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Reduce this process's payload rows ``[K_local, P]`` with every other worker's to ``[P]``.

        ``key`` names the payload stream (e.g. a Streaming DiLoCo fragment); ``weights``
        ``[K]`` (e.g. steps run under a deadline) turn the mean into a weighted mean, and a
        worker of weight 0 sent nothing: its error-feedback residual is kept unchanged;
        ``senders`` (global ids) exchange only those workers' payloads, pushed to a server.
        """
        if senders is not None:
            return self._push(rows, key, list(senders))
        parts = self.stream(key)
        codec, attack = parts["codec"], parts["attack"]
        if isinstance(codec, ErrorFeedback) and weights is not None:
            # a weight-0 worker sends nothing: its residual must not shrink (see the codec)
            enc = codec.encode(rows, weights[self.comm.local_ids] > 0)
        else:  # this process's workers only (error feedback is per worker)
            enc = codec.encode(rows)
        nbytes = enc.nbytes_per_worker()
        plain = attack is None and self.validator is None and self.plain_mean
        if self.comm.trusted and all_reduces(codec, plain):
            sent = codec.decode(enc)
            if weights is not None:  # the weighted mean as a mean of rescaled rows
                scale = weights * len(weights) / weights.sum()
                sent = sent * scale[self.comm.local_ids].to(sent)[:, None]
            return self.comm.all_reduce_mean(sent, nbytes=nbytes)
        gathered_enc = gather_encoded(self.comm, enc, nbytes)
        round_ = self.round_of()
        if self.comm.trusted:
            sent = codec.decode(gathered_enc)  # [K, P], every worker
            payloads: list[Any] = list(sent)
            if attack is not None:
                payloads = self._forge(parts, sent, round_)
            absent: dict[int, str] = {}
        else:  # peers' rows: some absent, each decoded alone (a bad one must not fail all)
            payloads, absent = decode_rows(codec, gathered_enc, self.comm.received)
        ok, reasons = validate_payloads(
            payloads, shape=tuple(rows.shape[1:]), dtype=torch.float32, max_abs=self.max_abs
        )
        reasons = {i: absent.get(i, r) for i, r in reasons.items() if absent.get(i) != ""}
        reasons.update(self.comm.rejected)
        self.stats.excluded = len(reasons)
        self.stats.excluded_total += len(reasons)
        for reason in reasons.values():
            log.warning("round %d: payload excluded: %s", round_, reason)
        if not ok and not self.comm.trusted:  # nothing usable arrived: this peer's own rows
            log.warning("round %d: no payload usable; this peer's own stands alone", round_)
            return codec.decode(enc).float().mean(0)
        if not ok:
            raise RuntimeError(f"round {round_}: every payload was rejected")
        gathered = torch.stack([payloads[i] for i in ok])
        w = None if weights is None else weights[ok]
        if self.validator is not None:
            present = None if w is None else w > 0
            scored = self.validator.weigh(gathered, ok, present)
            combined = scored if w is None else scored * w
            if combined.sum() > 0:
                w = combined
            else:
                log.warning("round %d: validator gave every payload weight 0; ignored", round_)
        return parts["aggregator"](gathered, w)

    def _forge(self, parts: dict[str, Any], sent: torch.Tensor, round_: int) -> list[Any]:
        """Every worker's payload as received: forged rows encoded with the wire's codec."""
        attack, byz = parts["attack"], self.byzantine.to(sent.device)
        if not attack.through_codec:  # a corrupt message: what arrives is broken
            return attack.forge(sent, byz, round_)
        forged = attack(sent, byz, round_)  # [K, P], the Byzantine rows replaced
        if round_ < attack.cfg.start_round:
            return list(forged)
        out = forged.clone()
        wire = parts["forge_codec"]
        enc = wire.encode(forged[byz])
        self.stats.forged_nbytes = enc.nbytes_per_worker()
        out[byz] = wire.decode(enc).to(out)
        return list(out)

    def _push(self, rows: torch.Tensor, key: str, senders: list[int]) -> torch.Tensor:
        """The mean of the ``senders``' payloads, each encoded with its own stream's codec."""
        local = self.comm.local_ids
        decoded = []
        for i in senders:
            codec = self.stream(f"{key}worker{i}")["codec"]  # error feedback per worker
            enc = codec.encode(rows[local.index(i)][None])
            decoded.append(codec.decode(_push_encoded(self.comm, enc, [i])))
        return self.stream(key)["aggregator"](torch.cat(decoded))

    def state_dict(self) -> dict[str, Any]:
        """Per-stream codec (error-feedback residuals), aggregator and attack state."""
        streams = {
            key: {n: obj.state_dict() for n, obj in parts.items() if obj is not None}
            for key, parts in self.streams.items()
        }
        out = {"streams": streams, "stats": dict(vars(self.stats))}
        if self.validator is not None:
            out["validator"] = self.validator.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for key, parts in state["streams"].items():
            for name, part_state in parts.items():
                self.stream(key)[name].load_state_dict(part_state)
        self.stats = ExchangeStats(**state["stats"])
        if self.validator is not None:
            self.validator.load_state_dict(state["validator"])


__all__ = ["ExchangePipeline", "ExchangeStats", "all_reduces", "decode_rows", "gather_encoded"]
