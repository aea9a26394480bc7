"""One permissionless peer: ``python -m diloco.peer comm.store=... worker.id=3 [overrides]``.

The peer is one worker of the run (``workers.count`` peers, ids ``0..K-1``), started on its
own, with no rendezvous: it trains its H inner steps, posts its pseudo-gradient to the store
and aggregates whatever the others posted in the window (:mod:`diloco.comm.bucket`). Its
run dir (``hydra.run.dir``) gets ``metrics.jsonl`` and ``summary.json`` as
``diloco.train`` writes them, for this peer's model.

A peer started with ``worker.join_round=r > 0`` (or restarted into a run whose store holds
a global checkpoint past round 0) loads the newest global checkpoint, announces the round it
joins, and takes part from there with a fresh inner optimizer, as a worker that crashed and
rejoined does in simulation (``faults``). ``worker.behavior`` makes a peer misbehave, for
experiments on what the others tolerate: ``malformed`` posts broken objects (garbage,
wrong shapes, NaNs, oversized, another peer's name, in turn), ``copy`` re-posts
``worker.copy_from``'s payload under its own name (with ``worker.copy_noise`` relative
noise: new bytes, the same direction, which only a validator's similarity check catches).
``worker.kill_at_round`` SIGKILLs the process when that round starts (a crash, for fault
tests). A restarted peer also skips the batches it trained on before (the rounds it posted
in), as a crashed worker's data goes on in simulation.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diloco import metrics as M
from diloco.build import build_parts
from diloco.comm.bucket import BucketComm
from diloco.comm.objects import fingerprint, pack, read_global, unpack
from diloco.comm.p2p import HivemindComm, probe
from diloco.comm.stores import StoreError
from diloco.compose import CONF_DIR, one_line, run_cli
from diloco.config import Config, ConfigError, from_dict, parse
from diloco.data import DataError, load_corpus
from diloco.faults import kill_self
from diloco.train import PEER_TRANSPORTS, execute
from diloco.trainer import Trainer

log = logging.getLogger("diloco")

ROUND_ALGORITHMS = ("DiLoCo", "StreamingDiLoCo")  # fedavg and sparseloco are DiLoCo


@dataclass
class PeerConfig:
    """This process's place in the run (``worker.*`` in ``conf/peer.yaml``)."""

    id: int = field(default=0, metadata={"ge": 0})
    join_round: int = field(default=0, metadata={"ge": 0})
    join_timeout_s: float = field(default=600.0, metadata={"gt": 0.0})
    rejoin_margin: int = field(default=2, metadata={"ge": 1})  # a restart: newest model + this
    behavior: Literal["honest", "malformed", "copy"] = "honest"
    copy_from: int = field(default=0, metadata={"ge": 0})
    copy_noise: float = field(default=0.0, metadata={"ge": 0.0})  # relative, on float tensors
    kill_at_round: int | None = field(default=None, metadata={"ge": 0})
    kill_mid_round: int | None = field(default=None, metadata={"ge": 0})  # comm=hivemind
    stall_at_round: int | None = field(default=None, metadata={"ge": 0})  # comm=hivemind


def check_peer(cfg: Config, worker: PeerConfig | None) -> None:
    """What a bucket peer (``worker``; None: the validator) cannot run, as one line.

    Checked before the store is opened.
    """
    k = cfg.workers.count
    kind = comm_kind(cfg)
    if kind is None or (worker is None and kind != "bucket"):
        raise ConfigError(
            "comm",
            "a peer exchanges through an object store (comm=bucket) or hivemind (comm=hivemind)"
            if worker is not None
            else "the validator reads an object store: use comm=bucket",
        )
    if kind == "hivemind":
        check_hivemind(cfg, worker)
    if worker is None and cfg.validator is None:
        raise ConfigError("validator", "diloco.validate scores with one: validator=gauntlet")
    if worker is not None and worker.id >= k:
        raise ConfigError(f"worker.id={worker.id}", f"must be < workers.count={k}")
    copying = worker is not None and worker.behavior == "copy"
    if copying and (worker.copy_from >= k or worker.copy_from == worker.id):  # type: ignore[union-attr]
        raise ConfigError(f"worker.copy_from={worker.copy_from}", f"another peer in [0, {k})")  # type: ignore[union-attr]
    target = str(cfg.algorithm.get("_target_", ""))
    if not target.endswith(ROUND_ALGORITHMS):
        name = target.rsplit(".", 1)[-1]
        raise ConfigError(
            f"algorithm={name}",
            "exchanges every inner step; bucket peers post rounds of local steps "
            "(diloco, fedavg, streaming_diloco, sparseloco)",
        )
    refusals = [
        (
            "attack",
            not str(cfg.attack.get("_target_", "")).endswith("NoAttack"),
            f"peers misbehave by worker.behavior=malformed|copy under comm={kind}",
        ),
        (
            "validator",
            worker is not None and cfg.validator is not None,
            f"runs as its own process under comm={kind}: python -m diloco.validate",
        ),
        (
            "sync",
            not str(cfg.sync.get("_target_", "")).endswith(".All"),
            f"windows are real under comm={kind}: use sync=all",
        ),
        (
            "faults",
            bool(cfg.faults.events or cfg.faults.rate),
            f"faults are real under comm={kind}: kill a peer or start it late",
        ),
        ("workers.ranks_per_worker", cfg.workers.ranks_per_worker > 1, "one process per peer"),
    ]
    for key, bad, why in refusals:
        if bad:
            raise ConfigError(key, why)


def comm_kind(cfg: Config) -> str | None:
    """``bucket`` or ``hivemind``: the peers' transport (None: not a peer's)."""
    return PEER_TRANSPORTS.get(str(cfg.comm.get("_target_", "")).rsplit(".", 1)[-1])


AVERAGED_CODECS = ("NoCodec", "FP16", "BF16", "Int8")  # a mean hivemind can all-reduce


def check_hivemind(cfg: Config, worker: PeerConfig | None) -> None:
    """What hivemind's averaging cannot run: anything that needs every payload."""
    codec = str(cfg.codec.get("_target_", "")).rsplit(".", 1)[-1]
    needs_rows = [
        ("aggregator", not str(cfg.aggregator.get("_target_", "")).endswith(".Mean")),
        ("codec", codec not in AVERAGED_CODECS),
        ("codec.error_feedback", bool(cfg.codec.get("error_feedback"))),
        ("validator", cfg.validator is not None),
    ]
    for key, bad in needs_rows:
        if bad:
            raise ConfigError(
                key,
                "hivemind averages (a mean of none, fp16, bf16 or int8 payloads); a run that "
                "needs every payload (aggregator, validator, sparse codec) needs comm=bucket "
                "or comm=torchdist",
            )
    if worker is not None and worker.behavior != "honest":
        raise ConfigError(
            f"worker.behavior={worker.behavior}", "misbehaving peers are a comm=bucket experiment"
        )


def _malformed(data: bytes, round_key: str, peer: int) -> bytes:
    """A broken object, a different kind each round."""
    tensors, meta = unpack(data)
    kind = int(round_key.split("-")[0]) % 5
    if kind == 0:
        return b"\x00not a safetensors object" * 8
    if kind == 1:
        return pack({k: v[: max(1, len(v) // 2)] for k, v in tensors.items()}, meta)
    if kind == 2:
        return pack({k: v.float() * float("nan") for k, v in tensors.items()}, meta)
    if kind == 3:
        return data * 3  # past the size limit
    return pack(tensors, {**meta, "peer": str(peer + 1)})


def run_rounds(parts: Any) -> int:
    """The rounds of the run: H inner steps each, the last one shorter."""
    return -(-parts.cfg.train.steps // parts.algorithm.inner_steps)


def param_shapes(parts: Any) -> set[tuple[int, ...]]:
    """The shapes of the model and of every parameter of the algorithm's optimizers."""
    shapes = {tuple(parts.group.global_param.shape)}
    for value in vars(parts.algorithm).values():
        for opt in value if isinstance(value, list | tuple) else [value]:
            if isinstance(opt, torch.optim.Optimizer):
                shapes |= {tuple(p.shape) for g in opt.param_groups for p in g["params"]}
    return shapes


def newest_global(
    comm: BucketComm, parts: Any, at_least: int = 0, only: int | None = None
) -> tuple[int, torch.Tensor, Any, int] | None:
    """The newest global checkpoint in the store that fits this run (:func:`read_global`)."""
    limit = 32 * parts.group.num_params + (1 << 20)  # the model and its state, in fp32
    own, shapes = parts.algorithm.state_dict(), param_shapes(parts)
    h, total = parts.algorithm.inner_steps, parts.cfg.train.steps
    max_abs = comm.cfg.max_abs or math.inf
    flat = parts.group.global_param.data
    for r, tensors, meta in comm.global_models(at_least, limit, only):
        try:
            return (r, *read_global(tensors, meta, flat, own, min(r * h, total), shapes, max_abs))
        except ValueError as err:
            log.warning("global checkpoint of round %d skipped: %s", r, err)
    return None


class PeerTrainer(Trainer):
    """The trainer of one bucket peer: joins late, posts global checkpoints, misbehaves."""

    def __init__(self, parts: Any, run_dir: Path, worker: PeerConfig) -> None:
        super().__init__(parts, run_dir)
        self.worker = worker
        self.joined = 0  # the first round this peer took part in
        if not isinstance(self.comm, BucketComm | HivemindComm):
            raise TypeError(f"a peer needs comm=bucket or comm=hivemind, not {self.comm}")
        comm: Any = self.comm
        self.bucket = comm  # the store, or hivemind's peers serving their state
        comm.round_of = lambda: self.round
        if isinstance(comm, HivemindComm):
            comm.codec = str(parts.cfg.codec.get("_target_", "")).rsplit(".", 1)[-1]
            comm.kill_at, comm.stall_at = worker.kill_mid_round, worker.stall_at_round
            comm.model_probe = lambda: probe(self.group.global_param.data)
        if worker.behavior == "malformed":
            comm.outgoing = lambda data, key: _malformed(data, key, worker.id)
        elif worker.behavior == "copy":
            comm.outgoing = self._copy

    def _copy(self, data: bytes, round_key: str) -> bytes | None:
        """The victim's object of this window, renamed as this peer's (None if it never came)."""
        c = self.bucket.cfg
        key = f"{self.bucket.run}/{round_key}/{self.worker.copy_from}"
        deadline = time.monotonic() + c.deadline_s
        while time.monotonic() < deadline:
            got = self.bucket.fetch(key, 4 * len(data) + 65536)
            if got is not None:
                try:
                    tensors, meta = unpack(got)
                except ValueError:
                    return None
                if self.worker.copy_noise > 0:  # a disguised copy: new bytes, same direction
                    g = torch.Generator().manual_seed(self.round)
                    for name, t in tensors.items():
                        if t.is_floating_point():
                            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
                            scale = self.worker.copy_noise * float(t.float().std())
                            tensors[name] = (t.float() + scale * noise).to(t.dtype)
                return pack(tensors, {**meta, "peer": str(self.worker.id)})
            time.sleep(c.poll_s)
        return None

    # -- joining --------------------------------------------------------------------------------

    def _newest_global(self, at_least: int = 0, only: int | None = None) -> Any:
        """The newest global checkpoint that fits this run: (round, model, state, step)."""
        return newest_global(self.bucket, self.parts, at_least, only)

    def join(self) -> int:
        """Load the global model to start from (late or restarted) and announce; its round."""
        w, comm = self.worker, self.bucket
        first = w.join_round
        if first == 0:  # a restarted peer: rejoin_margin rounds after the newest model, so
            found = self._newest_global()  # that its announcement reaches the others in time
            first = 0 if found is None or found[0] == 0 else found[0] + w.rejoin_margin
        if first == 0:
            past = comm.rounds_posted(1 << 30)
            if past:  # never train the run again from round 0 over its own old objects
                raise ConfigError(
                    "comm.run_id",
                    f"{comm.cfg.run_id.strip('/')!r} holds this peer's payloads of rounds "
                    f"{past[0]}..{past[-1]} "
                    "but no global model to rejoin from: use a fresh comm.run_id",
                )
            comm.announce(0)
            return self.joined
        rounds = run_rounds(self.parts)
        if first >= rounds:
            raise ConfigError(f"worker.join_round={first}", f"the run has {rounds} rounds")
        comm.announce(first)
        deadline = time.monotonic() + w.join_timeout_s
        found = self._newest_global(first)
        while found is None and time.monotonic() < deadline:
            time.sleep(comm.cfg.poll_s)
            found = self._newest_global(first)
        if found is None:
            raise ConfigError(
                f"worker.join_round={first}",
                f"no global model of that round in {getattr(comm.cfg, 'store', 'the DHT')} "
                f"after worker.join_timeout_s={w.join_timeout_s:g}",
            )
        self._start_from(*found)
        if found[0] != first:  # the others were past it already
            log.warning("peer %d: round %d was over; joining round %d", w.id, first, found[0])
            comm.announce(found[0])
        self.joined = found[0]
        return self.joined

    def _take(self, flat: torch.Tensor, state: Any) -> None:
        """The global model and the algorithm's state of others, as this peer's."""
        self.algorithm.load_state_dict(state)
        self.group.global_param.data.copy_(flat)
        self.group.pull()

    def _resync(self) -> None:
        """After a round averaged alone or apart: the others' model of the next round.

        A hivemind peer whose round went wrong (no group, or peers of another model) would
        otherwise train on alone, a window behind the others for good.
        """
        c, comm, me, r = self.bucket.cfg, self.bucket, self.worker.id, self.round
        comm.out_of_sync = False
        start, comm.seen_round = time.monotonic(), None
        quick = c.matchmaking_s + 2 * c.request_timeout_s  # nobody serving: alone for now
        while True:
            found = self._newest_global(self.round)
            # a peer serves an older state: the others are still averaging; wait for them
            limit = quick if comm.seen_round is None else quick + c.allreduce_timeout_s
            if found is not None or time.monotonic() >= start + limit:
                break
            time.sleep(c.poll_s)
        if found is None:
            log.warning("peer %d: no peer serves round %d or later: going on alone", me, r)
            return
        self._take(found[1], found[2])
        # the others may be rounds ahead: this peer skips to theirs (its data goes on)
        self.progress.round, self.progress.step = found[0], found[3]
        comm.stats["resynced"] += 1
        log.warning("peer %d: resynced to the others' model of round %d", me, found[0])

    def _start_from(self, round_: int, flat: torch.Tensor, state: Any, step: int) -> None:
        """Take the global model, the algorithm's state and the step of round ``round_``."""
        self._take(flat, state)
        self.progress.round, self.progress.step = round_, step
        # the batches this peer trained on before (a restart): its data goes on from there,
        # as a crashed worker's does in simulation
        h, total = self.algorithm.inner_steps, self.cfg.train.steps
        drawn = sum(min(h, total - r * h) for r in self.bucket.rounds_posted(round_))
        for _ in range(drawn):
            self.samplers[self.worker.id].next_batch()
        log.info(
            "peer %d joins at round %d (step %d, %d batches drawn before)",
            self.worker.id, round_, self.step, drawn,
        )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """The trainer's summary and the round this peer joined."""
        return {**super().summary(), "joined_round": self.joined}

    # -- the round ------------------------------------------------------------------------------

    def _round(self, plan: Any, logger: M.Logger) -> None:
        if self.worker.kill_at_round is not None and self.round >= self.worker.kill_at_round:
            log.warning(
                "peer %d: killed at round %d (worker.kill_at_round)", self.worker.id, self.round
            )
            sys.stdout.flush()
            kill_self()
        super()._round(plan, logger)

    def _end_round(self, row: dict[str, float], n: int, logger: M.Logger, last: bool) -> None:
        resync = not last and getattr(self.bucket, "out_of_sync", False)
        if resync:  # this round as it went, logged; then the others' model
            super()._end_round(row, n, logger, last)
            self._resync()
        if not last:  # the model the next round starts from, for late and restarted peers
            state = self.algorithm.state_dict()
            self.bucket.post_global(self.round, self.group.global_param.data, state, self.step)
        if not resync:
            super()._end_round(row, n, logger, last)


def run(node: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Validate, build this peer's parts, join, train, write ``summary.json``."""
    resolved: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    worker = from_dict(PeerConfig, resolved.pop("worker", {}) or {}, "worker")
    cfg = parse(resolved)
    check_peer(cfg, worker)

    def start(comm: Any, device: torch.device, run_dir: Path) -> tuple[Trainer, bool]:
        trainer = PeerTrainer(
            build_parts(cfg, comm, device, load_corpus(cfg.data)), run_dir, worker
        )
        return trainer, trainer.join() > 0

    run = fingerprint(resolved)
    return execute(
        resolved, cfg, run_dir, list(overrides or []), start, peer=worker.id, fingerprint=run
    )


@hydra.main(config_path=str(CONF_DIR), config_name="peer", version_base="1.3")
def _hydra_main(node: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    args = (node, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    out = one_line(lambda: run(*args), {ConfigError: 2, DataError: 2, StoreError: 2})
    return float(out["final_eval_loss"])


def main() -> None:
    """Console entry point."""
    run_cli(_hydra_main, "peer")


if __name__ == "__main__":
    main()
