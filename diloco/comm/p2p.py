"""Peers across the internet on hivemind: DHT discovery and butterfly all-reduce.

Each peer (one process, one worker: :mod:`diloco.peer` with ``comm=hivemind``) joins a
Kademlia DHT over libp2p (``comm.initial_peers``: the multiaddrs the first peer prints) and
averages its payload of every exchange with :class:`hivemind.averaging.DecentralizedAverager`
(Ryabinin et al., "Moshpit SGD", arXiv:2103.03239; hivemind's matchmaking and butterfly
all-reduce). Mean only: the update is ``mean_{i in group} Δ_i`` over the peers that formed
the group, as the simulated mean over the workers that took part.

- One group per exchange: the group key holds the round, the exchange within it and the
  attempt, so that peers of different rounds never average together (hivemind's own keys
  do not separate rounds). The group is full at ``comm.target_group_size`` (default: every
  peer) or closes ``comm.matchmaking_s`` after the first peer looked for it.
- Partial averages: hivemind can finish an all-reduce in which a peer died after sending
  part of its data (a dead reducer's part stays local; a dead sender is left out of the
  parts it did not send), different on each survivor. After every all-reduce the group
  runs a one-element vote all-reduce of "my all-reduce was whole"; unless it averages to 1
  the round is redone by every survivor with its own payload (``comm.retries``), then taken
  alone. A peer with nobody to average with keeps its own payload (as a lone worker would).
- State for late and restarted peers: every peer serves the model its last round ended
  with (:func:`diloco.comm.objects.pack_global`, as one uint8 tensor, checked on arrival
  like a bucket's global checkpoint) through ``load_state_from_peers``; the record of which
  peers took part in which rounds goes with it (a restarted peer's data position).
- Safe defaults: no NAT port mapping (UPnP), relays or AutoNAT unless asked; the DHT listens
  on ``comm.host`` (127.0.0.1).

Bytes are the butterfly formula ``2 (n-1)/n d`` each way for a group of ``n`` (hivemind keeps
no byte counters), with ``d`` the payload's size as hivemind serializes it under its
compression (``comm.compression``: ``auto`` maps codec fp16 to hivemind's fp16 and int8 to
its uniform 8-bit quantization, which also round the returned mean; otherwise fp32).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diloco.comm.base import Collective, CommConfig
from diloco.comm.inprocess import PeerComm
from diloco.comm.objects import pack_global, unpack
from diloco.config import ConfigError
from diloco.faults import kill_self

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "fp16", "uint8")
CODEC_COMPRESSION = {"NoCodec": "none", "FP16": "fp16", "Int8": "uint8"}
"""Our codec -> hivemind's compression under ``comm.compression=auto`` (others: none)."""


@dataclass
class HivemindConfig(CommConfig):
    """The DHT, matchmaking and the averager's timeouts."""

    topology: Literal["ring", "butterfly", "parameter_server", "object_store"] = "butterfly"
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs; [] for the first peer
    host: str = "127.0.0.1"  # the interface to listen on (0.0.0.0 across machines)
    port: int = field(default=0, metadata={"ge": 0})  # 0: a free port
    announce_maddrs: list[str] = field(default_factory=list)  # public multiaddrs, if behind NAT
    run_id: str = "run"  # the run's prefix in the DHT; peers of one run share it
    maddrs_file: str | None = None  # write this peer's multiaddrs there (the swarm reads it)
    compression: Literal["auto", "none", "fp16", "uint8"] = "auto"
    target_group_size: int = field(default=0, metadata={"ge": 0})  # 0: every peer
    matchmaking_s: float = field(default=5.0, metadata={"gt": 0.0})  # a group's window
    join_deadline_s: float = field(default=120.0, metadata={"gt": 0.0})  # ... in the first
    request_timeout_s: float = field(default=3.0, metadata={"gt": 0.0})
    allreduce_timeout_s: float = field(default=60.0, metadata={"gt": 0.0})
    chunk_timeout_s: float = field(default=5.0, metadata={"gt": 0.0})  # a silent peer is out
    retries: int = field(default=2, metadata={"ge": 0})  # redos of a partial average
    poll_s: float = field(default=0.5, metadata={"gt": 0.0})  # a joiner asking for state
    nat_port_map: bool = False  # UPnP on the LAN router: off unless asked
    use_relay: bool = False
    use_auto_relay: bool = False
    auto_nat: bool = False


PROBE_RTOL = 1e-5
"""Probes of models further apart than this are different models (rounding: ~1e-7)."""
_SIGNS: dict[int, torch.Tensor] = {}


def probe(flat: torch.Tensor) -> list[float]:
    """Two numbers that tell models apart: the sum and a fixed random-sign projection."""
    x = flat.detach().reshape(-1).cpu().double()
    if x.numel() not in _SIGNS:
        g = torch.Generator().manual_seed(0)
        _SIGNS[x.numel()] = torch.randint(0, 2, (x.numel(),), generator=g).double() * 2 - 1
    return [float(x.sum()), float(x @ _SIGNS[x.numel()])]


def members_of(gathered: dict[Any, Any]) -> dict[int, dict[str, Any]]:
    """Each group member's metadata by peer id; malformed entries (untrusted) left out."""
    out = {}
    for v in gathered.values():
        if isinstance(v, dict) and isinstance(v.get("peer"), int) and v["peer"] >= 0:
            out[v["peer"]] = v
    return out


def _hivemind() -> Any:
    try:
        import hivemind
    except ImportError:
        raise ConfigError("comm=hivemind", 'needs hivemind: pip install -e ".[p2p]"') from None
    return hivemind


def checked_averager(hivemind: Any) -> type:
    """Hivemind's averager with the partial-average vote after each all-reduce."""
    from hivemind.averaging.partition import AllreduceException
    from hivemind.compression import NoCompression

    class CheckedAverager(hivemind.averaging.DecentralizedAverager):
        state_fn: Callable[[], tuple[dict[str, Any], list[torch.Tensor]]] | None = None

        async def _run_allreduce_inplace_(
            self, tensors: Any, group_info: Any, group_id: Any = None, **kwargs: Any
        ) -> None:
            gid = group_info.group_id if group_id is None else group_id
            vote_id = gid + b".vote"  # registered before anyone can send its vote to us
            self._running_groups[vote_id] = asyncio.Future()
            try:
                await super()._run_allreduce_inplace_(tensors, group_info, gid, **kwargs)
                runner = self._running_groups[gid].result()
                whole = not runner.banned_senders and runner.tensor_part_container.failed_size == 0
                vote = torch.tensor([1.0 if whole else 0.0])
                kwargs = {**kwargs, "compression": NoCompression(), "tensor_infos": None}
                await super()._run_allreduce_inplace_([vote], group_info, vote_id, **kwargs)
                voter = self._running_groups[vote_id].result()
                if voter.tensor_part_container.failed_size:
                    raise AllreduceException("partial average? the vote's result was lost")
                if abs(float(vote[0]) - 1.0) > 1e-6:
                    raise AllreduceException(
                        f"partial average: {1 - float(vote[0]):.0%} of the group not whole"
                    )
            finally:
                pending = self._running_groups.pop(vote_id, None)
                if pending is not None and not pending.done():
                    pending.cancel()  # a late voter's handler is not left waiting

        def get_current_state(self) -> Any:  # served to late peers, run in this process
            if self.state_fn is None:
                return {}, [torch.zeros(0, dtype=torch.uint8)], None
            meta, tensors = self.state_fn()
            return meta, tensors, None

    return CheckedAverager


class HivemindComm(PeerComm):
    """This peer's exchanges over hivemind (see the module docstring).

    Args:
        cfg: :class:`HivemindConfig`.
        num_workers: K, the peers of the run (ids ``0..K-1``).
        peer: this process's worker id.
        fingerprint: the run's shared config (states of other runs are refused).
        codec: the exchange codec's class name (``comm.compression=auto``).
    """

    Config = HivemindConfig
    trusted = True  # an average: no row to check (runs needing every row are refused)

    def __init__(
        self,
        cfg: HivemindConfig | None = None,
        *,
        num_workers: int,
        peer: int = 0,
        fingerprint: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(cfg, num_workers=num_workers, peer=peer, fingerprint=fingerprint, **kwargs)
        c: HivemindConfig = self.cfg  # type: ignore[assignment]
        if not c.run_id or any(ch in c.run_id for ch in "./ "):
            raise ConfigError(f"comm.run_id={c.run_id}", "a DHT prefix: no '.', '/' or spaces")
        if c.request_timeout_s >= c.matchmaking_s:  # hivemind: matchmaking can deadlock
            raise ConfigError(
                f"comm.request_timeout_s={c.request_timeout_s:g}",
                f"must be below comm.matchmaking_s={c.matchmaking_s:g}",
            )
        if 0 < c.target_group_size < num_workers:
            raise ConfigError(
                f"comm.target_group_size={c.target_group_size}",
                f"0 or workers.count={num_workers}: groups of fewer peers end a round with "
                "different models (Moshpit averaging), which one model per run cannot hold",
            )
        self.hm = _hivemind()
        self.codec = "NoCodec"
        self.kill_at: int | None = None  # fault injection: SIGKILL mid all-reduce of this round
        self.stall_at: int | None = None  # fault injection: miss this round's window
        self.model_probe: Callable[[], list[float]] = lambda: []  # the round's start model
        self.out_of_sync = False  # averaged alone, or with peers of another model: resync
        self.lone = False  # the last exchange found nobody
        self.seen_round: int | None = None  # the round of the last state a peer served
        self.first = True  # the first exchange of each size waits comm.join_deadline_s
        self._started: set[int] = set()  # payload sizes exchanged once
        self._wire: dict[int, float] = {}
        self._averagers: dict[int, Any] = {}
        self.took_part: dict[int, list[int]] = {}  # peer -> rounds it averaged in
        self.stats = {
            "partial": 0, "alone": 0, "redone": 0, "exchanges": 0, "diverged": 0, "resynced": 0
        }  # fmt: skip
        self.group_sizes: list[int] = []
        self._state: tuple[dict[str, Any], list[torch.Tensor]] | None = None
        try:
            self.dht = self.hm.DHT(
                initial_peers=list(c.initial_peers),
                host_maddrs=[f"/ip4/{c.host}/tcp/{c.port}"],
                announce_maddrs=list(c.announce_maddrs) or None,
                start=True,
                nat_port_map=c.nat_port_map,
                use_relay=c.use_relay,
                use_auto_relay=c.use_auto_relay,
                auto_nat=c.auto_nat,
            )
        except Exception as err:  # a bad multiaddr, no peer answering
            raise ConfigError("comm.initial_peers", f"could not join the DHT: {err}") from None
        self.maddrs = [str(a) for a in self.dht.get_visible_maddrs()]
        log.info("peer %d multiaddrs: %s", peer, " ".join(self.maddrs))
        if c.maddrs_file:
            tmp = Path(f"{c.maddrs_file}.tmp")
            tmp.write_text("\n".join(self.maddrs) + "\n")
            tmp.replace(c.maddrs_file)
        self._server = self._averager(1, serve=True)  # serves this peer's state

    # -- averagers --------------------------------------------------------------------------------

    @property
    def compression(self) -> str:
        """The payloads' compression on the wire (``comm.compression``; auto: the codec's)."""
        c: HivemindConfig = self.cfg  # type: ignore[assignment]
        auto = CODEC_COMPRESSION.get(self.codec, "none")
        return auto if c.compression == "auto" else c.compression

    def _averager(self, numel: int, serve: bool = False) -> Any:
        """The averager of payloads of ``numel`` elements (one per size: the schema is fixed)."""
        key = -1 if serve else numel
        if key in self._averagers:
            return self._averagers[key]
        c: HivemindConfig = self.cfg  # type: ignore[assignment]
        comp = self.hm.compression
        wire = {"none": comp.NoCompression, "fp16": comp.Float16Compression}.get(
            self.compression, comp.Uniform8BitQuantization
        )()
        cls = checked_averager(self.hm)
        avg = cls(
            [torch.zeros(numel)],
            self.dht,
            start=True,
            prefix=f"{c.run_id}_{self.fingerprint[:8]}_{'state' if serve else numel}",
            target_group_size=c.target_group_size or self.num_workers,
            min_group_size=2,
            min_matchmaking_time=c.matchmaking_s,
            request_timeout=c.request_timeout_s,
            allreduce_timeout=c.allreduce_timeout_s,
            next_chunk_timeout=c.chunk_timeout_s,
            compression=wire,
            allow_state_sharing=serve,
            declare_state_period=max(1.0, c.matchmaking_s),
        )
        if threading.current_thread() is threading.main_thread():  # hivemind ignores SIGINT
            signal.signal(signal.SIGINT, signal.default_int_handler)  # after start: Ctrl-C stops
        if serve:
            avg.state_fn = self._served
        self._averagers[key] = avg
        return avg

    def _wire_bytes(self, numel: int) -> float:
        """One peer's payload as hivemind serializes it under the compression."""
        from hivemind.compression import CompressionInfo

        if numel not in self._wire:
            x = torch.zeros(numel)
            wire = self._averager(numel).allreduce_kwargs["compression"]
            self._wire[numel] = float(wire.compress(x, CompressionInfo.from_tensor(x)).ByteSize())
        return self._wire[numel]

    # -- the exchange -----------------------------------------------------------------------------

    def all_reduce_mean(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """The mean over the group this exchange formed (this peer's row alone without one)."""
        self._nbytes([rows], nbytes)
        row = rows[0].detach().float().cpu().reshape(-1)
        r, n = self._next_exchange()
        avg = self._averager(row.numel())
        c: HivemindConfig = self.cfg  # type: ignore[assignment]
        self.stats["exchanges"] += 1
        out = None
        # the first exchange of a size waits for the others (starting up, or starting that
        # size's averager); a redo does not
        window = (
            c.join_deadline_s if self.first or row.numel() not in self._started else c.matchmaking_s
        )
        self.first = False
        self._started.add(row.numel())
        if self.stall_at == r and n == 0:
            log.warning("peer %d: stalls past round %d's window (stall_at_round)", self.peer, r)
            time.sleep(window + 2 * c.request_timeout_s + 1.0)
        digest = self.model_probe()
        for attempt in range(c.retries + 1):
            with avg.get_tensors() as t:
                t[0].copy_(row)
            avg.set_group_bits(f"{r:032b}{n:04b}{attempt:04b}")
            try:
                start = self.hm.utils.get_dht_time() + window
                found_by = window + 2 * c.request_timeout_s + 1.0  # the group, or none
                run = self.fingerprint
                control = avg.step(
                    gather={"round": r, "peer": self.peer, "model": digest, "run": run},
                    scheduled_time=start,
                    timeout=found_by, allow_retries=False, wait=False,
                )  # fmt: skip
                if self.kill_at == r:
                    self._die_mid_allreduce(control)
                gathered = control.result(timeout=found_by + c.allreduce_timeout_s + 10)
            except Exception as err:  # no group, a partial average, a timeout
                window = c.matchmaking_s
                partial = "partial average" in str(err)
                self.stats["partial"] += partial
                if "could not find a group" not in str(err) and attempt < c.retries:
                    self.stats["redone"] += 1
                    log.warning("round %d: %s; redone with the survivors", r, err or repr(err))
                    continue
                log.warning("round %d: no group (%s); this peer's payload alone", r, repr(err))
                break
            group_meta = members_of(gathered)
            if len(group_meta) != len(gathered) or any(
                v.get("round") != r or v.get("run") != self.fingerprint for v in group_meta.values()
            ):
                log.warning("round %d: a group member of another round or run; taken alone", r)
                break
            members = list(group_meta)
            with avg.get_tensors() as t:
                out = t[0].clone()
            self._check_models(gathered, digest, r)
            for p in members:
                self.took_part.setdefault(p, []).append(r)
            group = len(gathered)
            self.group_sizes.append(group)
            sent, recv = self.reduce_topology.bytes(group, self._wire_bytes(row.numel()))
            self.sent += sent[0]
            self.recv += recv[0]
            self.pending.append(Collective(self.reduce_topology, self._wire_bytes(row.numel())))
            break
        self.lone = out is None
        if out is None:
            self.stats["alone"] += 1
            self.out_of_sync = self.num_workers > 1  # the others may have gone on without it
            self.group_sizes.append(1)
            self.took_part.setdefault(self.peer, []).append(r)
            out = row
        return out.reshape(rows.shape[1:]).to(rows.device)

    def _check_models(self, gathered: dict[Any, Any], digest: list[float], r: int) -> None:
        """Flag this peer out of sync if its model is not the lowest-id member's.

        Peers drift apart when an all-reduce ended whole for some and partial for others.
        Models are compared by :func:`probe` (equal peers differ by float rounding only);
        not under lossy compression, whose rounding of the returned mean sets peers apart.
        """
        if self.compression != "none":
            return
        models = {p: v.get("model") for p, v in members_of(gathered).items()}
        if not models or min(models) == self.peer:  # the lowest id keeps its own
            return
        theirs = models[min(models)]  # a peer's metadata: untrusted
        if (
            not isinstance(theirs, list)
            or len(theirs) != len(digest)
            or not all(isinstance(a, int | float) for a in theirs)
        ):
            theirs = [math.inf] * len(digest)
        pairs = zip(theirs, digest, strict=True)
        if any(not abs(a - b) <= PROBE_RTOL * (abs(b) + 1.0) for a, b in pairs):
            self.stats["diverged"] += 1
            self.out_of_sync = True
            log.warning("round %d: this peer's model differs from peer %d's", r, min(models))

    def _die_mid_allreduce(self, control: Any) -> None:
        """SIGKILL this peer's process group once its all-reduce runs (a fault test)."""
        from hivemind.averaging.control import AveragingStage

        deadline = time.monotonic() + 60
        while control.stage != AveragingStage.RUNNING_ALLREDUCE and time.monotonic() < deadline:
            time.sleep(0.001)
        log.warning("peer %d: killed mid all-reduce of round %d", self.peer, self.kill_at)
        for h in logging.getLogger().handlers:
            h.flush()
        kill_self()

    def all_gather_parts(
        self, parts: Sequence[torch.Tensor], nbytes: float | None = None
    ) -> list[torch.Tensor]:
        """Not over hivemind: a butterfly all-reduce gives the mean, not every row."""
        raise ConfigError(
            "comm=hivemind",
            "averages only: every payload (an aggregator, attack, validator or this codec) "
            "needs comm=bucket or comm=torchdist",
        )

    # -- state for late peers ---------------------------------------------------------------------

    def announce(self, first_round: int) -> None:
        """Nothing to announce: a group forms from whoever looks for it."""

    def post_global(self, round_: int, flat: torch.Tensor, state: Any, step: int) -> bool:
        """Serve the model ``round_`` starts from (with the algorithm's state) from now on."""
        meta = {"peer": str(self.peer), "round": str(round_), "run": self.fingerprint}
        data = pack_global(flat, state, step, meta)
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        took = {str(p): rounds for p, rounds in self.took_part.items()}
        self._state = ({"round": round_, "took_part": took}, [tensor])
        # joiners ask the newest first; a peer that just averaged alone, after them
        self._server.state_sharing_priority = float(round_) - 0.5 * self.lone
        return True

    def _served(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        if self._state is None:
            return {}, [torch.zeros(0, dtype=torch.uint8)]
        return self._state

    def global_models(
        self, at_least: int = 0, max_bytes: int = 1 << 30, only: int | None = None
    ) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, str]]]:
        """The state a peer serves, if its round is ``>= at_least`` (``only``: that round).

        Untrusted: bounded in size, unpacked as safetensors (never unpickled), its metadata
        naming this run; the caller checks the contents (:func:`read_global`).
        """
        c: HivemindConfig = self.cfg  # type: ignore[assignment]
        try:
            got = self._server.load_state_from_peers(timeout=c.request_timeout_s + 10)
        except Exception as err:  # nobody serving yet, a peer gone mid-download
            log.info("no state from peers (%s)", err)
            return
        if not got:
            return
        meta, tensors = got
        if not isinstance(meta, dict) or len(tensors) != 1 or tensors[0].dtype != torch.uint8:
            log.warning("a peer's state skipped: not one byte tensor with metadata")
            return
        data = tensors[0]
        r = meta.get("round")
        if not isinstance(r, int):
            return
        self.seen_round = r  # a peer serves: worth waiting for a newer state
        if r < at_least or (only is not None and r != only):
            return
        if data.numel() > max_bytes:
            log.warning("a peer's state skipped: %d bytes > %d", data.numel(), max_bytes)
            return
        try:
            body, info = unpack(data.numpy().tobytes())
        except ValueError as err:
            log.warning("a peer's state skipped: %s", err)
            return
        if info.get("run") != self.fingerprint or info.get("round") != str(r):
            log.warning("a peer's state skipped: another run's, or another round's")
            return
        took = meta.get("took_part")
        if isinstance(took, dict):  # untrusted: peers of this run, rounds before r, once each
            for p, rounds in took.items():
                if not (str(p).isdigit() and int(p) < self.num_workers) or not isinstance(
                    rounds, list
                ):
                    continue
                ok = {x for x in rounds[:r] if isinstance(x, int) and 0 <= x < r}
                mine = self.took_part.setdefault(int(p), [])
                mine[:] = sorted({*mine, *ok})
        yield r, body, info

    def rounds_posted(self, before: int) -> list[int]:
        """The rounds before ``before`` this peer averaged in (from the state it loaded)."""
        return [r for r in self.took_part.get(self.peer, []) if r < before]

    # -- records ----------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The size of the last group."""
        return {"group_size": float(self.group_sizes[-1])} if self.group_sizes else {}

    def summary(self) -> dict[str, Any]:
        """This peer's bytes and how its exchanges went."""
        return {
            "peer": self.peer,
            "comm_bytes_per_worker": self.sent.item(),
            "comm_bytes_total": self.sent.item(),
            "comm_recv_bytes": self.recv.item(),
            "hivemind": {
                **self.stats,
                "compression": self.compression,
                "group_sizes": self.group_sizes,
                "multiaddrs": self.maddrs,
            },
        }

    def close(self) -> None:
        """Shut the averagers and the DHT down (their processes and the p2p daemon)."""
        for avg in self._averagers.values():
            try:
                avg.shutdown()
            except Exception as err:  # a daemon already gone
                log.debug("averager shutdown: %s", err)
        self._averagers = {}
        try:
            self.dht.shutdown()
        except Exception as err:
            log.debug("dht shutdown: %s", err)
