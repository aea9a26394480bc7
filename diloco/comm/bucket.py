"""Exchange through an object store: permissionless peers that post and gather, Templar-style.

No peer waits on a collective. For each exchange of round ``r`` a peer (one process, one
worker, started on its own: :mod:`diloco.peer`) puts its encoded payload as one safetensors
object at ``<run_id>/<r>/<peer>`` and gathers the objects present when the window closes:

- the window closes when every *expected* peer has posted, when ``quorum`` peers have (if
  set), or ``deadline_s`` after this peer posted (``join_deadline_s`` in the first round it
  takes part in, while the others start up), whichever comes first. Expected: every peer,
  except those that announced a later first round (``<run_id>/join/<peer>``) and those that
  missed this peer's previous window (a dead peer costs one deadline, not one per round);
- every object is untrusted (:func:`read_payload`): size limit, safetensors header,
  metadata (peer, round), tensor names, dtypes and shapes equal to this peer's own, finite
  floats; the same tensors as an object posted earlier this round (a copy) or in an earlier
  round (stale) are excluded too. Exclusions carry a one-line reason (:attr:`rejected`);
  index ranges and magnitudes are checked after decoding by the exchange
  (:mod:`diloco.exchange.pipeline`, which decodes each received row on its own);
- the model after each round is posted as a global checkpoint
  (``<run_id>/global/<r>/<peer>``, safetensors: parameters, the algorithm's state and the
  step, see :func:`pack_state`) by the lowest-id peer among those it aggregated, so that a
  late or restarted peer can catch up (:meth:`BucketComm.latest_global`).

Bytes are the sizes of the objects put and got (this peer's, :attr:`sent` / :attr:`recv`);
modelled time charges an object-store gather of that size; wall time is measured.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from diloco.comm.base import Collective, CommConfig
from diloco.comm.inprocess import PeerComm
from diloco.comm.objects import number, pack, pack_global, read_payload, tensor_digest, unpack
from diloco.comm.stores import StoreError, open_store
from diloco.config import ConfigError

log = logging.getLogger(__name__)

VALIDATOR_KEY = "DILOCO_VALIDATOR_KEY"
"""The environment variable holding the secret a validator signs its weights with."""


@dataclass
class BucketConfig(CommConfig):
    """Where the objects go, and when a window closes."""

    topology: Literal["ring", "butterfly", "parameter_server", "object_store"] = "object_store"
    store: str = "file://runs/store"  # file:///path, a plain path, or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible servers other than AWS
    run_id: str = "run"  # the run's prefix in the store; peers of one run share it
    deadline_s: float = field(default=30.0, metadata={"gt": 0.0})
    join_deadline_s: float = field(default=120.0, metadata={"gt": 0.0})
    quorum: int = field(default=0, metadata={"ge": 0})  # 0: wait for every expected peer
    poll_s: float = field(default=0.05, metadata={"gt": 0.0})
    store_timeout_s: float = field(default=5.0, metadata={"gt": 0.0})  # one store request
    checkpoint_every: int = field(default=1, metadata={"ge": 1})  # rounds between globals


class BucketComm(PeerComm):
    """This peer's exchanges through the store (see the module docstring).

    Args:
        cfg: :class:`BucketConfig`.
        num_workers: K, the peers of the run (ids ``0..K-1``).
        peer: this process's worker id.
    """

    Config = BucketConfig
    trusted = False  # rows come from peers: excluded rows are reported in :attr:`rejected`

    def __init__(
        self,
        cfg: BucketConfig | None = None,
        *,
        num_workers: int,
        peer: int = 0,
        fingerprint: str = "",
        **kwargs: Any,
    ) -> None:
        # -1: an observer (the validator), posting nothing
        super().__init__(
            cfg, num_workers=num_workers, peer=peer, fingerprint=fingerprint, observer=True,
            **kwargs,
        )  # fmt: skip
        c: BucketConfig = self.cfg  # type: ignore[assignment]
        try:
            self.store = open_store(c.store, c.endpoint_url, c.store_timeout_s)
        except ValueError as err:
            raise ConfigError(f"comm.store={c.store}", str(err)) from None
        try:
            self.store.check()
        except StoreError as err:
            raise ConfigError(f"comm.store={c.store}", str(err)) from None
        self.run = c.run_id.strip("/")
        self.outgoing: Callable[[bytes, str], bytes | None] | None = None  # a peer's behaviour
        self.received: torch.Tensor | None = None
        self.rejected: dict[int, str] = {}
        self.kinds: dict[int, str] = {}  # the kind of each exclusion of the last window
        self.missed: set[int] = set()
        self.first = True
        self._seen: dict[str, str] = {}  # digest -> "round/peer" of recent objects
        self.skipped = 0  # windows in which the store failed this peer
        self.excluded: dict[str, int] = {}  # reason kind -> count, for the summary
        self._announced: dict[int, tuple[float, int]] = {}  # peer -> (mtime, first round)
        self.checkpoint_bytes = 0  # global models put (not payload traffic)
        self.arrivals: dict[int, float] = {}  # the last window's objects' store times

    # -- keys -----------------------------------------------------------------------------------

    def _round_key(self) -> str:
        r, n = self._next_exchange()
        return str(r) if n == 0 else f"{r}-{n}"

    def _meta(self, round_key: str) -> dict[str, str]:
        return {"peer": str(self.peer), "round": round_key, "run": self.fingerprint}

    def announce(self, first_round: int) -> None:
        """Tell the others the first round this peer will post in."""
        self.store.put(f"{self.run}/join/{self.peer}", str(first_round).encode())

    def _joins(self) -> dict[int, int]:
        """Each peer's announced first round (one listing; an object is read when it changes)."""
        for info in self._list(f"{self.run}/join/"):
            p = number(info.key.rsplit("/", 1)[-1])
            if (
                p is None
                or p >= self.num_workers
                or self._announced.get(p, (None,))[0] == info.mtime
            ):
                continue
            data = self.fetch(info.key, 32)
            first = number(data.decode("ascii", "replace").strip()) if data is not None else None
            if first is not None:
                self._announced[p] = (info.mtime, first)
        return {p: r for p, (_, r) in self._announced.items()}

    def _expected(self, joins: dict[int, int], r: int) -> set[int]:
        """The peers this window waits for: joined by round ``r``, not missing since."""
        out = set()
        for p in range(self.num_workers):
            first = joins.get(p, 0)
            if p != self.peer and first <= r and not (p in self.missed and first < r):
                out.add(p)
        return out

    def _list(self, prefix: str) -> list[Any]:
        try:
            return self.store.list(prefix)
        except StoreError as err:
            log.warning("store: %s", err)
            return []

    def _posters(self, prefix: str) -> dict[int, Any]:
        """The peers with an object under ``prefix`` (their listing entries), this one's aside."""
        out: dict[int, Any] = {}
        for info in self._list(prefix):
            p = number(info.key.rsplit("/", 1)[-1])
            if p is not None and p != self.peer and p < self.num_workers:
                out.setdefault(p, info)
        return out

    def fetch(self, key: str, max_bytes: int) -> bytes | None:
        """The object at ``key`` (None: missing, larger than ``max_bytes``, or a store error)."""
        try:
            return self.store.get(key, max_bytes)
        except StoreError as err:
            log.warning("store: %s", err)
            return None

    # -- the exchange ---------------------------------------------------------------------------

    def all_gather_parts(
        self, parts: Sequence[torch.Tensor], nbytes: float | None = None
    ) -> list[torch.Tensor]:
        """Post this peer's rows, gather the others' objects; ``[K, ...]`` per part.

        Rows of peers absent or excluded are zeros; :attr:`received` marks the rows that
        arrived and passed, :attr:`rejected` gives each excluded peer's reason.
        """
        parts = list(parts)
        self._nbytes(parts, nbytes)
        round_key = self._round_key()
        r = self.round_of()
        mine = {f"part{j}": p[0] for j, p in enumerate(parts)}
        honest = pack(mine, self._meta(round_key))
        data = honest if self.outgoing is None else self.outgoing(honest, round_key)
        prefix = f"{self.run}/{round_key}/"
        posted = False
        if data is not None:
            try:
                self.store.put(f"{prefix}{self.peer}", data)
                self.sent += len(data)
                posted = True
            except StoreError as err:
                self.skipped += 1
                log.warning("round %s: could not post (%s); gathering only", round_key, err)
        rows = self.collect(round_key, r, mine, len(honest))
        size = float(len(data)) if data is not None else float(nbytes or 0.0)
        self.pending.append(Collective(self.gather_topology, size))  # modelled time
        out = [torch.zeros(self.num_workers, *p.shape[1:], dtype=p.dtype) for p in parts]
        self.received = torch.zeros(self.num_workers, dtype=torch.bool)
        for p, tensors in rows.items():
            self.received[p] = True
            for j, o in enumerate(out):
                o[p] = tensors[f"part{j}"]
        for j, o in enumerate(out):
            o[self.peer] = parts[j][0].detach().cpu()
        # a payload the others could not get is left out here too (the same views), unless
        # it is all there is
        self.received[self.peer] = posted or not rows
        return [o.to(parts[j].device) for j, o in enumerate(out)]

    def collect(
        self, round_key: str, r: int, like: dict[str, torch.Tensor], own_size: int
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Wait for the window of ``round_key`` to close; the objects that passed, by peer.

        ``like``: this peer's own tensors (what a valid object holds); ``own_size``: its
        object's size (the size limit is twice that plus 64 KiB). Sets :attr:`rejected`.
        """
        c: BucketConfig = self.cfg  # type: ignore[assignment]
        prefix = f"{self.run}/{round_key}/"
        if self.missed and round_key.isdigit() and r > 0:  # posted after I closed r - 1: back
            self.missed -= set(self._posters(f"{self.run}/{r - 1}/"))
        started = time.monotonic()
        observing = self.peer < 0  # the validator's window opens with the first object
        joins = self._joins()
        infos: dict[int, Any] = {}
        while True:
            expected = self._expected(joins, r)
            for p, info in self._posters(prefix).items():
                if observing and not infos:
                    started = time.monotonic()
                infos.setdefault(p, info)  # first seen: the order of arrival
            posted = set(infos)
            me = 0 if observing else 1
            if expected <= posted or (c.quorum and len(posted) + me >= c.quorum):
                break
            # a peer's first window (this one's, or one joining now) allows for a start-up
            joining = self.first or any(joins.get(p, 0) == r > 0 for p in expected - posted)
            limit = c.join_deadline_s if joining or (observing and not infos) else c.deadline_s
            if time.monotonic() >= started + limit:
                late = sorted(expected - posted)
                log.info("round %s: window closed after %.1f s without %s", round_key, limit, late)
                break
            time.sleep(c.poll_s)
            joins = self._joins()  # a peer may announce a later first round meanwhile
        for p in expected | self.missed:
            (self.missed.discard if p in infos else self.missed.add)(p)
        self.first = False
        rows, digests = self._read(infos, round_key, like, own_size)
        self._remember(digests, round_key)
        self.arrivals = {p: info.mtime for p, info in infos.items()}
        return rows

    def _read(
        self, infos: dict[int, Any], round_key: str, mine: dict[str, torch.Tensor], own: int
    ) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, str]]:
        """Get and check the gathered objects; exclude copies (the later one) and stale ones."""
        limit = 2 * max(own, 1) + 65536
        self.rejected, self.kinds = {}, {}
        got: dict[int, tuple[dict[str, torch.Tensor], str, float]] = {}
        for p, info in sorted(infos.items()):
            if info.size > limit:
                self._reject(p, f"oversized: {info.size} bytes > {limit}", "oversized")
                continue
            data = self.fetch(info.key, limit)
            if data is None:
                self._reject(p, "could not be read from the store", "unreadable")
                continue
            self.recv += len(data)
            try:
                tensors, digest = read_payload(data, p, round_key, mine, self.fingerprint)
            except ValueError as err:
                kind = "stale" if str(err).startswith("stale") else "malformed"
                self._reject(p, str(err), kind)
                continue
            got[p] = (tensors, digest, info.mtime)
        own_digest = tensor_digest(mine) if self.peer >= 0 else ""
        by_digest: dict[str, list[int]] = {}
        for p, (_, digest, _) in got.items():
            by_digest.setdefault(digest, []).append(p)
        for digest, peers in by_digest.items():
            if digest in self._seen:
                for p in peers:
                    self._reject(p, f"stale: the payload of {self._seen[digest]} again", "stale")
                continue
            if digest == own_digest:
                for p in peers:
                    self._reject(p, f"copy of peer {self.peer}'s payload (this peer)", "copy")
                continue
            if len(peers) > 1:  # one row of these tensors is aggregated, whoever made them:
                order = list(infos)  # the earliest in the store, then the first seen
                keep = min(peers, key=lambda p: (got[p][2], order.index(p)))
                tied = [got[p][2] for p in peers].count(got[keep][2]) > 1
                for p in (p for p in peers if p != keep):  # a tie blames nobody: copy_tie
                    if tied and got[p][2] == got[keep][2]:
                        why = f"the same payload as peer {keep}'s, at the same store time"
                        self._reject(p, why, "copy_tie")
                    else:
                        why = f"copy of peer {keep}'s payload (posted no earlier)"
                        self._reject(p, why, "copy")
        # a peer follows the validator's newest weights; the validator scores everyone anew
        flags = self._flags(int(round_key.split("-")[0])) if self.peer >= 0 else {}
        for p in got:
            if p not in self.rejected and p in flags:
                self._reject(p, f"flagged by the validator in round {flags[p]}", "flagged")
        rows = {p: t for p, (t, _, _) in got.items() if p not in self.rejected}
        digests = {own_digest: str(self.peer)} if own_digest else {}
        for p, (_, d, _) in sorted(got.items(), key=lambda item: item[1][2]):
            digests.setdefault(d, str(p))  # the first poster of those tensors
        return rows, digests

    def _signature(self, round_: int, weights: torch.Tensor) -> str:
        """HMAC-SHA256 of the weights, their round and the run, under the validator's key."""
        key = os.environ.get(VALIDATOR_KEY, "")
        message = f"{round_}/{self.fingerprint}/".encode() + weights.float().numpy().tobytes()
        return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()

    def post_weights(self, round_: int, weights: torch.Tensor) -> None:
        """Publish a validator's weights ``[K]`` for ``round_`` (0: flagged), signed.

        The signature (:data:`VALIDATOR_KEY`, shared by the validator and the peers) lets a
        peer tell them from weights anyone with write access to the store could post.
        """
        sig = self._signature(round_, weights)
        data = pack({"weights": weights.float()}, {"round": str(round_), "sig": sig})
        self.store.put(f"{self.run}/weights/{round_}", data)

    def _flags(self, r: int) -> dict[int, int]:
        """Peers of weight 0 in the newest validator weights before round ``r`` -> that round.

        Only weights signed with :data:`VALIDATOR_KEY` count (none without the key).
        """
        if not os.environ.get(VALIDATOR_KEY):
            return {}
        named = (number(info.key.rsplit("/", 1)[-1]) for info in self._list(f"{self.run}/weights/"))
        rounds = [q for q in named if q is not None and q < r]
        if not rounds:
            return {}
        q = max(rounds)
        data = self.fetch(f"{self.run}/weights/{q}", 16 * self.num_workers + 65536)
        try:
            w = unpack(data or b"")[0]["weights"]
        except (ValueError, KeyError):
            log.warning("validator weights of round %d unreadable: ignored", q)
            return {}
        if w.shape != (self.num_workers,) or w.dtype != torch.float32:
            log.warning("validator weights of round %d have shape %s: ignored", q, tuple(w.shape))
            return {}
        meta = unpack(data or b"")[1]
        if not hmac.compare_digest(meta.get("sig", ""), self._signature(q, w)):
            log.warning(
                "validator weights of round %d not signed with %s: ignored", q, VALIDATOR_KEY
            )
            return {}
        return {p: q for p in range(self.num_workers) if not bool(w[p] > 0)}

    def _reject(self, p: int, reason: str, kind: str) -> None:
        self.rejected[p] = f"peer {p}: {reason}"
        self.kinds[p] = kind
        self.excluded[kind] = self.excluded.get(kind, 0) + 1

    def _remember(self, digests: dict[str, str], round_key: str) -> None:
        """Keep the digests of the last rounds' objects (a stale payload is one of them)."""
        for d, p in digests.items():
            self._seen[d] = f"round {round_key} of peer {p}"
        while len(self._seen) > 8 * self.num_workers:
            self._seen.pop(next(iter(self._seen)))

    def all_reduce_mean(self, rows: torch.Tensor, nbytes: float | None = None) -> torch.Tensor:
        """The mean of the rows gathered (absent and excluded peers left out)."""
        parts = self.all_gather_parts([rows], nbytes)
        assert self.received is not None
        return parts[0][self.received].float().mean(0)

    # -- global checkpoints -------------------------------------------------------------------

    def post_global(self, round_: int, flat: torch.Tensor, state: Any, step: int) -> bool:
        """Post the model at the start of ``round_`` if this peer leads the last window.

        The lowest id among the peers whose payloads it aggregated (itself included) posts,
        every ``checkpoint_every`` rounds; True when posted.
        """
        c: BucketConfig = self.cfg  # type: ignore[assignment]
        ids = (
            [self.peer]
            if self.received is None
            else torch.nonzero(self.received).flatten().tolist()
        )
        if round_ % c.checkpoint_every or min(ids) != self.peer:
            return False
        data = pack_global(flat, state, step, self._meta(str(round_)))
        try:
            self.store.put(f"{self.run}/global/{round_}/{self.peer}", data)
            self.checkpoint_bytes += len(data)
        except StoreError as err:
            log.warning("round %d: could not post the global checkpoint (%s)", round_, err)
            return False
        return True

    def global_models(
        self, at_least: int = 0, max_bytes: int = 1 << 30, only: int | None = None
    ) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, str]]]:
        """Global checkpoints of round ``>= at_least`` (``only``: that round), newest first.

        Untrusted: each is bounded in size, read, and yielded only if its metadata names its
        key's round and peer and this run, and the store holds payloads of the round before
        (a checkpoint of a round nobody reached is forged); the caller checks the contents
        (:func:`diloco.comm.objects.read_global`).
        """
        found: dict[int, list[tuple[int, Any]]] = {}
        where = f"{self.run}/global/" + ("" if only is None else f"{only}/")
        for info in self._list(where):
            parts = info.key.split("/")
            r, p = number(parts[-2]) if len(parts) > 1 else None, number(parts[-1])
            if r is not None and p is not None and r >= at_least:
                found.setdefault(r, []).append((p, info))
        for r in sorted(found, reverse=True):
            before = (number(i.key.rsplit("/", 1)[-1]) for i in self._list(f"{self.run}/{r - 1}/"))
            if r > 0 and all(p is None for p in before):
                log.warning(
                    "global checkpoint of round %d skipped: no payloads of round %d", r, r - 1
                )
                continue
            for p, info in sorted(found[r], key=lambda x: x[0]):
                data = self.fetch(info.key, max_bytes) if info.size <= max_bytes else None
                try:
                    tensors, meta = unpack(data or b"")
                except ValueError as err:
                    log.warning("global checkpoint %s skipped: %s", info.key, err)
                    continue
                mine = meta.get("run") == self.fingerprint or not self.fingerprint
                if meta.get("round") == str(r) and meta.get("peer") == str(p) and mine:
                    yield r, tensors, meta

    def posts(self, before: int) -> dict[int, list[int]]:
        """Each peer's rounds before ``before`` in which it posted a payload (one listing)."""
        out: dict[int, set[int]] = {}
        for info in self._list(f"{self.run}/"):
            parts = info.key[len(self.run) + 1 :].split("/")  # <round>/<peer> only
            r, p = (number(parts[0]), number(parts[1])) if len(parts) == 2 else (None, None)
            if r is not None and p is not None and r < before:
                out.setdefault(p, set()).add(r)
        return {p: sorted(rs) for p, rs in out.items()}

    def rounds_posted(self, before: int) -> list[int]:
        """The rounds before ``before`` in which this peer posted a payload (a restart's past)."""
        return self.posts(before).get(self.peer, [])

    def rounds_seen(self, at_least: int) -> bool:
        """Whether the store holds payloads of round ``at_least`` or later (the run went on)."""
        return any(r >= at_least for rounds in self.posts(1 << 62).values() for r in rounds)

    def summary(self) -> dict[str, Any]:
        """This peer's bytes, exclusions by kind, windows the store failed it."""
        return {
            "peer": self.peer,
            "comm_bytes_per_worker": self.sent.item(),
            "comm_bytes_total": self.sent.item(),
            "comm_recv_bytes": self.recv.item(),
            "excluded": dict(self.excluded),
            "store_failures": self.skipped,
            "comm_checkpoint_bytes": self.checkpoint_bytes,
        }
