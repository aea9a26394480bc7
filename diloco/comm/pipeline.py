"""The exchange pipeline: what happens to payload rows between the local and the apply phase.

::

    rows [K_local, P] fp32    local phase of the algorithm (pseudo-gradients, gradients)
      -> codec.encode         quantize / sparsify in transit (error feedback per worker)
      -> collective           all-reduce when the result is a plain mean of a payload a ring
                              can sum at its width (fp32, fp16, bf16, int8) and nothing is
                              to be inspected; else all-gather of the encoded tensors. Bytes
                              counted from the encoding
      -> attack               Byzantine payloads rewritten, with what the honest workers send
                              in view (every process applies the same seeded attack to the
                              gathered rows, so simulated and distributed runs agree)
      -> validate             untrusted input: shape, dtype, finite, magnitude; a bad row is
                              excluded with a logged reason and the run goes on
      -> aggregator           [n_ok, P] -> [P] in fp32 (mean, median, Krum, ...)

Algorithms never see any of this: they receive the ``[P]`` update. With the default config
(no codec, no attack, mean) the pipeline is exactly ``comm.all_reduce_mean(rows)``. State
(error-feedback residuals, a centered-clipping center, a stale attacker's history) is kept
per payload stream ``key``, so fragment-wise algorithms get one per fragment.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from diloco.adversary.aggregators import Aggregator, Mean, build_aggregator
from diloco.adversary.attacks import Attack, Malformed, build_attack
from diloco.adversary.validate import validate_payloads
from diloco.adversary.validator import Gauntlet
from diloco.comm.base import Communicator
from diloco.comm.codecs import Codec, Encoded, ErrorFeedback, NoCodec, build_codec
from diloco.config import Config, ConfigError, from_dict

log = logging.getLogger(__name__)

# codecs whose payload a ring all-reduce can sum at the encoded width (re-quantizing per hop)
RING_CODECS = ("none", "fp16", "bf16", "int8")


@dataclass
class CodecSpec:
    """Keys of the ``codec`` node that are not the codec's own arguments."""

    error_feedback: bool = False
    ef_decay: float = field(default=1.0, metadata={"ge": 0.0, "le": 1.0})


@dataclass
class NoSpec:
    """A node whose keys all belong to the plug-in (aggregators)."""


@dataclass
class AttackSpec:
    """Who is Byzantine: ``ids``, else the last ``num_byzantine`` workers."""

    num_byzantine: int = field(default=0, metadata={"ge": 0})
    ids: list[int] | None = None


def _split(node: dict[str, Any], key: str, spec: type) -> tuple[str, dict[str, Any], Any]:
    if "name" not in node:
        raise ConfigError(f"{key}.name", "missing; pick one from conf/" + key)
    own = {f.name for f in dataclasses.fields(spec)}
    kwargs = {k: v for k, v in node.items() if k != "name" and k not in own}
    return str(node["name"]), kwargs, from_dict(spec, {k: node[k] for k in own if k in node}, key)


def build_codec_node(node: dict[str, Any]) -> Codec:
    """``codec`` config node -> codec, wrapped in error feedback when asked."""
    name, kwargs, spec = _split(node, "codec", CodecSpec)
    codec = build_codec(name, **kwargs)
    return ErrorFeedback(codec, decay=spec.ef_decay) if spec.error_feedback else codec


def byzantine_mask(node: dict[str, Any], num_workers: int) -> torch.Tensor:
    """The ``[K]`` mask of Byzantine workers named by the ``attack`` node."""
    _, _, spec = _split(node, "attack", AttackSpec)
    k = num_workers
    ids = spec.ids
    if ids is None:
        if spec.num_byzantine >= k:
            raise ConfigError(f"attack.num_byzantine={spec.num_byzantine}", f"must be < {k}")
        ids = list(range(k - spec.num_byzantine, k))
    if any(not 0 <= i < k for i in ids):
        raise ConfigError(f"attack.ids={ids}", f"every id must be in [0, {k - 1}]")
    mask = torch.zeros(k, dtype=torch.bool)
    mask[ids] = True
    if mask.all():
        raise ConfigError(f"attack.ids={ids}", "at least one worker must be honest")
    return mask


def gather_encoded(comm: Communicator, enc: Encoded, nbytes: float) -> Encoded:
    """All-gather an encoding's wire tensors (one collective) -> every worker's ``Encoded``."""
    names = [n for n in ("values", "indices", "scales") if getattr(enc, n) is not None]
    parts = comm.all_gather_parts([getattr(enc, n) for n in names], nbytes=nbytes)
    return Encoded((comm.num_workers, enc.shape[1]), **dict(zip(names, parts, strict=True)))


def wire_name(codec: Codec) -> str:
    """The registry name of what travels (error feedback does not change the wire format)."""
    return wire_name(codec.codec) if isinstance(codec, ErrorFeedback) else codec.name


@dataclass
class ExchangeStats:
    """What the last exchange did: rows excluded."""

    excluded: int = 0
    excluded_total: int = 0


class ExchangePipeline:
    """Codec, attack, collective, validation and aggregation around one communicator.

    Args:
        comm: the communicator (counts bytes).
        codec, aggregator, attack: factories; one instance of each per payload stream.
        byzantine: ``[K]`` mask of the workers the attack controls.
        max_abs: payload entries above this magnitude are malformed (None: no bound).
    """

    def __init__(
        self,
        comm: Communicator,
        codec: Callable[[], Codec] = NoCodec,
        aggregator: Callable[[], Aggregator] = Mean,
        attack: Callable[[], Attack] | None = None,
        byzantine: torch.Tensor | None = None,
        max_abs: float | None = None,
    ) -> None:
        self.comm = comm
        self.factories = {"codec": codec, "aggregator": aggregator, "attack": attack}
        self.streams: dict[str, dict[str, Any]] = {}
        zeros = torch.zeros(comm.num_workers, dtype=torch.bool)
        self.byzantine = byzantine if byzantine is not None else zeros
        self.max_abs = max_abs
        self.validator: Gauntlet | None = None  # set by the trainer (needs the model)
        self.round = 0
        self.stats = ExchangeStats()

    @classmethod
    def from_config(cls, comm: Communicator, cfg: Config) -> ExchangePipeline:
        """Build from the config; every value is checked now, not at the first exchange."""
        k = comm.num_workers
        codec = functools.partial(build_codec_node, cfg.codec)
        agg_name, agg_kwargs, _ = _split(cfg.aggregator, "aggregator", NoSpec)
        aggregator = functools.partial(build_aggregator, agg_name, **agg_kwargs)
        mask = byzantine_mask(cfg.attack, k)
        atk_name, atk_kwargs, _ = _split(cfg.attack, "attack", AttackSpec)
        attack = None
        if atk_name not in ("none", "poison") and mask.any():  # poison acts on data
            attack = functools.partial(build_attack, atk_name, **atk_kwargs)
        probe = torch.randn(k, 8, generator=torch.Generator().manual_seed(0))
        codec().encode(probe)

        def attack_probe(a: Any) -> Any:
            if isinstance(a, Malformed):
                return a.corrupt_payloads(list(probe), mask, 10**9)
            return a(probe, mask, 10**9)

        for key, make, call in (
            ("aggregator", aggregator, lambda a: a(probe)),
            ("attack", attack, attack_probe),
        ):
            try:
                if make is not None:
                    call(make())
            except ValueError as err:  # e.g. f too large for K workers
                raise ConfigError(key, f"{err} (with workers.count={k})") from None
        return cls(comm, codec, aggregator, attack, mask, cfg.comm.max_abs)

    def stream(self, key: str = "") -> dict[str, Any]:
        """Codec, aggregator and attack instances (and their state) of payload stream ``key``."""
        if key not in self.streams:
            self.streams[key] = {n: f() if f else None for n, f in self.factories.items()}
        return self.streams[key]

    def __call__(
        self, rows: torch.Tensor, key: str = "", weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reduce this process's payload rows ``[K_local, P]`` with every other worker's to ``[P]``.

        ``key`` names the payload stream (e.g. a Streaming DiLoCo fragment); ``weights``
        ``[K]`` (e.g. steps run under a deadline) turn the mean into a weighted mean.
        """
        parts = self.stream(key)
        codec, attack = parts["codec"], parts["attack"]
        enc = codec.encode(rows)  # this process's workers only (error feedback is per worker)
        nbytes = enc.nbytes_per_worker()
        plain = attack is None and self.validator is None and type(parts["aggregator"]) is Mean
        if plain and wire_name(codec) in RING_CODECS:
            sent = codec.decode(enc)
            if weights is not None:  # the weighted mean as a mean of rescaled rows
                scale = weights * len(weights) / weights.sum()
                sent = sent * scale[self.comm.local_ids].to(sent)[:, None]
            return self.comm.all_reduce_mean(sent, nbytes=nbytes)
        sent = codec.decode(gather_encoded(self.comm, enc, nbytes))  # [K, P], every worker
        payloads: list[Any] = list(sent)
        if isinstance(attack, Malformed):
            payloads = attack.corrupt_payloads(payloads, self.byzantine, self.round)
        elif attack is not None:
            payloads = list(attack(sent, self.byzantine, self.round))
        ok, reasons = validate_payloads(
            payloads, shape=tuple(rows.shape[1:]), dtype=sent.dtype, max_abs=self.max_abs
        )
        self.stats.excluded = len(reasons)
        self.stats.excluded_total += len(reasons)
        for reason in reasons.values():
            log.warning("round %d: payload excluded: %s", self.round, reason)
        if not ok:
            raise RuntimeError(f"round {self.round}: every payload was rejected")
        gathered = torch.stack([payloads[i] for i in ok])
        w = None if weights is None else weights[ok]
        if self.validator is not None:
            scored = self.validator.weigh(gathered, ok)
            if scored.sum() > 0:
                w = scored if w is None else scored * w
            else:
                log.warning("round %d: validator gave every payload weight 0; ignored", self.round)
        return parts["aggregator"](gathered, w)

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
