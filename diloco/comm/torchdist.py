"""K workers over the ranks of a torch.distributed process group (gloo on CPU, NCCL on GPU).

Each rank hosts a contiguous block of workers (:class:`Placement`); the block sizes may differ
by one (3 workers on 2 ranks: ``[0, 1]`` and ``[2]``). Worker ids, seeds and data shards
depend on the worker id only, so a run gives the same model whatever the placement.

Collectives:

- ``all_reduce_mean``: each rank sums its rows, one ``all_reduce(SUM)``, divide by K.
- ``all_gather_parts``: each rank packs its rows of every part (any dtype) into one byte
  matrix ``[K_local, B]``, padded to the largest block; one ``all_gather``; the rows are put
  back in global worker order and unpacked. An encoding's values, indices and scales thus
  travel as what they are, in one collective, and nothing is ever unpickled.

Bytes are accounted exactly as in simulation (:class:`InProcessComm`), by the topology model.
Every collective runs under the process group's timeout; a peer that died or stalled becomes
a :class:`CommError` naming the collective, not a hang.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from diloco.comm.base import CommConfig
from diloco.comm.inprocess import InProcessComm
from diloco.config import ConfigError

log = logging.getLogger(__name__)


class CommError(RuntimeError):
    """A collective failed: a peer died, stalled past the timeout, or the network broke."""


@dataclass(frozen=True)
class Placement:
    """Which workers each rank hosts: contiguous blocks, the first ``K % N`` ranks one more.

    A worker is one rank today (``ranks_per_worker = 1``). A worker spanning several ranks
    (a ZeRO or FSDP island inside a node, DiLoCo across islands) maps ``ranks_per_worker``
    consecutive ranks to one block of workers; those ranks would shard the block's replicas
    among themselves and one of them takes part in the cross-worker exchange.
    """

    num_workers: int
    world_size: int
    ranks_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.ranks_per_worker != 1:
            raise NotImplementedError("a worker spanning several ranks is not supported yet")
        if self.num_workers < self.world_size:
            raise ConfigError(
                f"workers.count={self.num_workers}",
                f"fewer workers than ranks ({self.world_size}); each rank hosts at least one",
            )

    @property
    def counts(self) -> list[int]:
        """Workers per rank."""
        base, extra = divmod(self.num_workers, self.world_size)
        return [base + (r < extra) for r in range(self.world_size)]

    def workers_of(self, rank: int) -> list[int]:
        """Global ids of the workers hosted by ``rank``."""
        counts = self.counts
        start = sum(counts[:rank])
        return list(range(start, start + counts[rank]))


def init_from_env(device: torch.device, backend: str, timeout_s: float) -> None:
    """Join the process group torchrun's environment describes.

    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` must be set;
    ``backend="auto"`` is NCCL on CUDA, else gloo.
    """
    if dist.is_initialized():
        return
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise ConfigError(
            "comm=torchdist",
            f"{', '.join(missing)} not set: launch with torchrun (see README, 'Run for real')",
        )
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("comm.dist_backend=nccl", f"needs device=cuda, not {device}")
    if device.type == "cuda":  # one GPU per process on the node
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=timeout_s)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts it
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent,
        timeout=timeout,
    )
    # keys of a restarted attempt never meet a dead attempt's (stale peer addresses made
    # gloo's connect fail or hang after torchrun restarts)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"diloco/attempt{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)
    log.info("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), backend)


def shared_path(path: Path) -> Path:
    """Rank 0's ``path`` on every rank (their timestamped Hydra dirs may differ by a second).

    Sent as bytes in two broadcasts, so nothing is unpickled.
    """
    device = _collective_device()
    data = torch.tensor(list(str(path).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    dist.broadcast(size, 0)
    buf = data if dist.get_rank() == 0 else torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(buf, 0)
    return Path(bytes(buf.cpu().tolist()).decode())


def _collective_device() -> torch.device | None:
    """Where small collective tensors must live: this GPU under NCCL, else anywhere (CPU)."""
    return (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )


class TorchDistComm(InProcessComm):
    """The communicator over the default process group (joined from torchrun's environment).

    Args:
        cfg: topology (byte accounting and modelled time, as in simulation), ``dist_backend``
            and ``timeout_s`` (enforced by the process group, reported in errors).
        num_workers: K, all workers of the run.
        device: this rank's device (NCCL needs its GPU); joins the process group when no
            group is initialized yet.
    """

    def __init__(
        self, cfg: CommConfig | None = None, *, num_workers: int, device: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(cfg, num_workers=num_workers, **kwargs)
        timeout_s = self.cfg.timeout_s
        self.joined = not dist.is_initialized()  # this object joined, so it leaves
        if self.joined:
            init_from_env(device or torch.device("cpu"), self.cfg.dist_backend, timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        try:
            self.placement = Placement(num_workers, self.world_size)
        except BaseException:
            self.close()  # a bad placement must not leave the process group joined
            raise
        self.local_ids = self.placement.workers_of(self.rank)
        self.timeout_s = timeout_s
        self.calls = 0
        self.device = _collective_device()

    def _run(self, what: str, fn: object) -> None:
        self.calls += 1
        try:
            fn()  # type: ignore[operator]
        except (RuntimeError, dist.DistError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CommError(
                f"comm: {what} (collective #{self.calls}) failed on rank {self.rank} of "
                f"{self.world_size}: a peer died, stalled past comm.timeout_s="
                f"{self.timeout_s:g}, or the network failed ({first})"
            ) from err

    def _sum_rows(self, rows: torch.Tensor) -> torch.Tensor:
        total = rows.sum(0)
        self._run("all_reduce", lambda: dist.all_reduce(total))
        return total

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (metrics)."""
        out = values.to(self.device or values.device, copy=True)
        self._run("all_reduce of metrics", lambda: dist.all_reduce(out))
        return out.to(values.device)

    def barrier(self) -> None:
        """Wait for every rank."""
        self._run("barrier", dist.barrier)

    def shared_path(self, path: Path) -> Path:
        """Rank 0's ``path`` on every rank."""
        return shared_path(path)

    def close(self) -> None:
        """Leave the process group, if this communicator joined it."""
        if self.joined and dist.is_initialized():
            dist.destroy_process_group()

    def push(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """Not over ranks: asynchronous pushes are simulated in one process."""
        raise NotImplementedError("push: asynchronous exchange runs in one process only")

    def _gather(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        k = len(self.local_ids)
        cols = [p.detach().reshape(k, p[0].numel()).contiguous().view(torch.uint8) for p in parts]
        widths = [c.shape[1] for c in cols]
        counts = self.placement.counts
        buf = torch.zeros(max(counts), sum(widths), dtype=torch.uint8, device=parts[0].device)
        buf[:k] = torch.cat(cols, 1)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        self._run("all_gather", lambda: dist.all_gather(out, buf))
        rows = torch.cat([o[:c] for o, c in zip(out, counts, strict=True)])
        result, start = [], 0
        for p, w in zip(parts, widths, strict=True):
            flat = rows[:, start : start + w].reshape(-1).clone()  # aligned, for any dtype
            result.append(flat.view(p.dtype).reshape(self.num_workers, *p.shape[1:]))
            start += w
        return result
