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
    """Which workers each rank hosts.

    With ``ranks_per_worker = 1``: contiguous blocks, the first ``K % N`` ranks one more.
    With ``ranks_per_worker = R > 1`` (islands, :mod:`diloco.islands`): ``R`` consecutive
    ranks form an island that is one worker, so ``N / R`` islands, worker ``i`` on ranks
    ``i R .. i R + R - 1``. Each of those ranks holds a shard of the worker and exchanges it
    with the ranks holding the same shard in the other islands (its cross group), so seen
    from a cross group every island is one rank hosting one worker.
    """

    num_workers: int
    world_size: int
    ranks_per_worker: int = 1

    def __post_init__(self) -> None:
        r, n, k = self.ranks_per_worker, self.world_size, self.num_workers
        if r > 1 and n % r:
            raise ConfigError(
                f"workers.ranks_per_worker={r}", f"{n} ranks do not split into islands of {r}"
            )
        if r > 1 and k != n // r:
            raise ConfigError(
                f"workers.count={k}",
                f"{n} ranks in islands of {r} (workers.ranks_per_worker) make {n // r} "
                f"workers, one per island: set workers.count={n // r}",
            )
        if k < n // r:
            raise ConfigError(
                f"workers.count={k}",
                f"fewer workers than ranks ({n}); each rank hosts at least one",
            )

    @property
    def group_size(self) -> int:
        """Ranks in one exchange group: all of them, or one per island."""
        return self.world_size // self.ranks_per_worker

    @property
    def counts(self) -> list[int]:
        """Workers per rank of the exchange group."""
        base, extra = divmod(self.num_workers, self.group_size)
        return [base + (r < extra) for r in range(self.group_size)]

    def workers_of(self, rank: int) -> list[int]:
        """Global ids of the workers hosted by (global) ``rank``."""
        if self.ranks_per_worker > 1:
            return [rank // self.ranks_per_worker]
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
        ranks_per_worker: R; above 1 the ranks form islands (:class:`Placement`): a
            ``(K, R)`` device mesh whose ``intra`` groups are the islands and whose ``cross``
            groups join the ranks holding the same shard. The workers' collectives run over
            this rank's cross group, so :attr:`sent` and :attr:`recv` count this rank's bytes
            (its shard); intra-island traffic is counted apart (:meth:`count_intra`), and
            :meth:`summary` adds both up over the islands.
    """

    def __init__(
        self,
        cfg: CommConfig | None = None,
        *,
        num_workers: int,
        device: Any = None,
        ranks_per_worker: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(cfg, num_workers=num_workers, **kwargs)
        timeout_s = self.cfg.timeout_s
        self.joined = not dist.is_initialized()  # this object joined, so it leaves
        if self.joined:
            init_from_env(device or torch.device("cpu"), self.cfg.dist_backend, timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        try:
            self.placement = Placement(num_workers, self.world_size, ranks_per_worker)
        except BaseException:
            self.close()  # a bad placement must not leave the process group joined
            raise
        self.local_ids = self.placement.workers_of(self.rank)
        self.timeout_s = timeout_s
        self.calls = 0
        self.device = _collective_device()
        self.ranks_per_worker = ranks_per_worker
        self.mesh: Any = None
        self.cross: Any = None  # the workers' exchange group (None: every rank)
        self.intra = torch.zeros(1, dtype=torch.float64)  # this rank's intra-island bytes
        if ranks_per_worker > 1:
            from torch.distributed.device_mesh import init_device_mesh

            kind = "cuda" if self.device is not None else "cpu"
            shape = (self.placement.group_size, ranks_per_worker)
            self.mesh = init_device_mesh(kind, shape, mesh_dim_names=("cross", "intra"))
            self.cross = self.mesh.get_group("cross")

    @property
    def member(self) -> int:
        """This rank's place in its island (its shard index)."""
        return self.rank % self.ranks_per_worker

    def count_intra(self, nbytes: float) -> None:
        """Add ``nbytes`` sent by this rank inside its island (gradient sync, gathers)."""
        self.intra += nbytes

    def metrics(self) -> dict[str, float]:
        """``comm/intra_bytes``: this rank's intra-island bytes so far (islands only)."""
        return {"comm/intra_bytes": self.intra.item()} if self.ranks_per_worker > 1 else {}

    def summary(self) -> dict[str, Any]:
        """Islands: bytes per worker (its ranks' shards together), per rank, intra-island.

        ``comm_bytes_per_worker`` is then what the simulated run of the same workers counts
        (one whole pseudo-gradient per worker), ``comm_bytes_per_rank`` a rank's part of it.
        """
        r = self.ranks_per_worker
        if r == 1:
            return {}
        mine = torch.stack([self.sent.mean(), self.intra[0]])
        total_sent, total_intra = self.all_reduce_sum(mine).tolist()  # over every rank
        return {
            "ranks_per_worker": r,
            "comm_bytes_per_worker": total_sent / self.placement.group_size,
            "comm_bytes_per_rank": total_sent / self.world_size,
            "comm_bytes_total": total_sent,
            "comm_intra_bytes_per_rank": total_intra / self.world_size,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Byte counters (and the intra-island one), for checkpoints."""
        return {**super().state_dict(), "intra": self.intra.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore byte counters."""
        super().load_state_dict(state)
        self.intra.copy_(state.get("intra", torch.zeros(1, dtype=torch.float64)))

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
        self._run("all_reduce", lambda: dist.all_reduce(total, group=self.cross))
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
        out = [torch.empty_like(buf) for _ in range(self.placement.group_size)]
        self._run("all_gather", lambda: dist.all_gather(out, buf, group=self.cross))
        rows = torch.cat([o[:c] for o, c in zip(out, counts, strict=True)])
        result, start = [], 0
        for p, w in zip(parts, widths, strict=True):
            flat = rows[:, start : start + w].reshape(-1).clone()  # aligned, for any dtype
            result.append(flat.view(p.dtype).reshape(self.num_workers, *p.shape[1:]))
            start += w
        return result
