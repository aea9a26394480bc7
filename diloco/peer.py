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
``worker.copy_from``'s payload under its own name. ``worker.kill_at_round`` SIGKILLs the
process when that round starts (a crash, for fault tests).
"""

from __future__ import annotations

import logging
import os
import signal
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
from diloco.comm.objects import pack, pack_state, unpack, unpack_state
from diloco.comm.stores import StoreError
from diloco.compose import CONF_DIR, run_cli
from diloco.config import Config, ConfigError, from_dict, parse
from diloco.data import DataError, load_corpus
from diloco.train import execute
from diloco.trainer import Trainer

log = logging.getLogger("diloco")

ROUND_ALGORITHMS = ("DiLoCo", "StreamingDiLoCo")  # fedavg and sparseloco are DiLoCo


@dataclass
class PeerConfig:
    """This process's place in the run (``worker.*`` in ``conf/peer.yaml``)."""

    id: int = field(default=0, metadata={"ge": 0})
    join_round: int = field(default=0, metadata={"ge": 0})
    join_timeout_s: float = field(default=600.0, metadata={"gt": 0.0})
    behavior: Literal["honest", "malformed", "copy"] = "honest"
    copy_from: int = field(default=0, metadata={"ge": 0})
    kill_at_round: int | None = field(default=None, metadata={"ge": 0})


def check_peer(cfg: Config, worker: PeerConfig) -> None:
    """What a bucket peer cannot run, as one line naming the key, before the store is opened."""
    k = cfg.workers.count
    if not str(cfg.comm.get("_target_", "")).endswith("BucketComm"):
        raise ConfigError("comm", "a peer exchanges through an object store: use comm=bucket")
    if worker.id >= k:
        raise ConfigError(f"worker.id={worker.id}", f"must be < workers.count={k}")
    if worker.behavior == "copy" and (worker.copy_from >= k or worker.copy_from == worker.id):
        raise ConfigError(f"worker.copy_from={worker.copy_from}", f"another peer in [0, {k})")
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
            "peers misbehave by worker.behavior=malformed|copy under comm=bucket",
        ),
        ("validator", cfg.validator is not None, "not available under comm=bucket"),
        (
            "sync",
            not str(cfg.sync.get("_target_", "")).endswith(".All"),
            "windows are real under comm=bucket (comm.deadline_s, comm.quorum): use sync=all",
        ),
        (
            "faults",
            bool(cfg.faults.events or cfg.faults.rate),
            "faults are real under comm=bucket: kill a peer or start it late",
        ),
        ("workers.ranks_per_worker", cfg.workers.ranks_per_worker > 1, "one process per peer"),
    ]
    for key, bad, why in refusals:
        if bad:
            raise ConfigError(key, why)


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


class PeerTrainer(Trainer):
    """The trainer of one bucket peer: joins late, posts global checkpoints, misbehaves."""

    def __init__(self, parts: Any, run_dir: Path, worker: PeerConfig) -> None:
        super().__init__(parts, run_dir)
        self.worker = worker
        self.joined = 0  # the first round this peer took part in
        comm = self.comm
        assert isinstance(comm, BucketComm)
        self.bucket = comm
        comm.round_of = lambda: self.round
        if worker.behavior == "malformed":
            comm.outgoing = lambda data, key: _malformed(data, key, worker.id)
        elif worker.behavior == "copy":
            comm.outgoing = self._copy

    def _copy(self, data: bytes, round_key: str) -> bytes | None:
        """The victim's object of this window, renamed as this peer's (None if it never came)."""
        c = self.bucket.cfg
        key = f"{self.bucket.run}/{round_key}/{self.worker.copy_from}"
        deadline = time.monotonic() + c.deadline_s  # type: ignore[attr-defined]
        while time.monotonic() < deadline:
            got = self.bucket._get(key, 4 * len(data) + 65536)
            if got is not None:
                try:
                    tensors, meta = unpack(got)
                except ValueError:
                    return None
                return pack(tensors, {**meta, "peer": str(self.worker.id)})
            time.sleep(c.poll_s)  # type: ignore[attr-defined]
        return None

    # -- joining --------------------------------------------------------------------------------

    def join(self) -> int:
        """Load the global model to start from (late or restarted) and announce; its round."""
        w, comm = self.worker, self.bucket
        first = w.join_round
        if first == 0:  # a restarted peer: two rounds after the newest model, so that its
            found = comm.latest_global()  # announcement reaches the others before then
            first = 0 if found is None or found[0] == 0 else found[0] + 2
        if first == 0:
            comm.announce(0)
            return self.joined
        rounds = -(-self.cfg.train.steps // self.algorithm.inner_steps)
        if first >= rounds:
            raise ConfigError(f"worker.join_round={first}", f"the run has {rounds} rounds")
        comm.announce(first)
        deadline = time.monotonic() + w.join_timeout_s
        limit = 32 * self.group.num_params + (1 << 20)  # the model and its state, in fp32
        found = comm.latest_global(first, limit)
        while found is None and time.monotonic() < deadline:
            time.sleep(comm.cfg.poll_s)  # type: ignore[attr-defined]
            found = comm.latest_global(first, limit)
        if found is None:
            raise ConfigError(
                f"worker.join_round={first}",
                f"no global model of that round in {comm.cfg.store} "  # type: ignore[attr-defined]
                f"after worker.join_timeout_s={w.join_timeout_s:g}",
            )
        self._load_global(*found)
        if found[0] != first:  # the others were past it already
            log.warning("peer %d: round %d was over; joining round %d", w.id, first, found[0])
            comm.announce(found[0])
        self.joined = found[0]
        return self.joined

    def _load_global(
        self, round_: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]
    ) -> None:
        flat = tensors.get("global")
        p = self.group.global_param.data
        if flat is None or flat.shape != p.shape or not bool(torch.isfinite(flat).all()):
            raise ConfigError("comm.store", f"the global checkpoint of round {round_} does not fit")
        state = unpack_state(
            {k[2:]: v for k, v in tensors.items() if k.startswith("s.")}, meta.get("state", "{}")
        )
        p.copy_(flat.to(p))
        self.group.pull()
        self.algorithm.load_state_dict(state)
        self.progress.round = round_
        self.progress.step = int(meta.get("step", "0"))
        log.info("peer %d joins at round %d (step %d)", self.worker.id, round_, self.step)

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
            os.kill(os.getpid(), signal.SIGKILL)
        super()._round(plan, logger)

    def _end_round(self, row: dict[str, float], n: int, logger: M.Logger, last: bool) -> None:
        if not last:  # the model the next round starts from, for late and restarted peers
            tensors, skeleton = pack_state(self.algorithm.state_dict())
            body = {
                "global": self.group.global_param.data,
                **{f"s.{k}": v for k, v in tensors.items()},
            }
            self.bucket.post_global(self.round, body, {"state": skeleton, "step": str(self.step)})
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

    return execute(resolved, cfg, run_dir, list(overrides or []), start, peer=worker.id)


@hydra.main(config_path=str(CONF_DIR), config_name="peer", version_base="1.3")
def _hydra_main(node: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    try:
        out = run(node, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
        return float(out["final_eval_loss"])
    except (ConfigError, DataError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point."""
    run_cli(_hydra_main, "peer")


if __name__ == "__main__":
    main()
