"""Islands: a DiLoCo worker that spans R ranks (DDP, FSDP2 or DeepSpeed ZeRO inside).

Under ``comm=torchdist`` with ``workers.ranks_per_worker=R``, the N ranks form N/R islands of
R consecutive ranks (:class:`diloco.comm.torchdist.Placement`), and each island is one
worker, as in OpenDiLoCo (Jaghouar et al., arXiv 2407.07852) and INTELLECT-1 (arXiv
2412.01152): data-parallel or sharded training inside an island, DiLoCo (Douillard et al.,
arXiv 2311.08105) across islands. A worker's batch (``train.batch_size``) is split among its
ranks, so an island computes the gradient of the same ``B`` sequences as the simulated worker;
the engine (``island.engine``) averages it inside the island and steps the inner optimizer.

Across islands each rank owns a shard of the worker: FSDP2's local shards, ZeRO's fp32
partitions, or under DDP (every rank holds the whole model) the ``1/R`` slice
``chunk(P, R)[member]``. :class:`IslandGroup` is the worker group of that shard: its one row is
the shard (``[1, P_shard]``) and its global model the same shard of the global model, so the
algorithm, the exchange (codec, collective over the rank's cross group, attack, aggregation)
and the outer optimizer run unchanged on shards, and no rank ever holds the whole model when
the engine shards it (the outer state is sharded the same way). Per round, on the rank of
shard ``s`` of island ``i``::

    delta_i[s] = theta_global[s] - theta_i[s]
    theta_global[s] = OuterOpt(theta_global[s], mean_i delta_i[s])
    theta_i[s] = theta_global[s]              (DDP, ZeRO-1/2: then all-gathered in the island)

What needs the whole pseudo-gradient in one place is refused with a one-line error
(:func:`check_islands`): aggregators and attacks that measure distances between whole
payloads, the validator, DeMo-style and streaming algorithms, asynchronous sync, and codecs
that follow tensor geometry. Element-wise codecs (fp16, bf16) give the simulated run's model;
block and top-k codecs act within each shard (same bytes, other choices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diloco.config import Config, ConfigError
from diloco.island_engines import ENGINES, Engine

Batch = tuple[torch.Tensor, torch.Tensor]

# what an island can run is what works coordinate by coordinate on a shard
AGGREGATORS = ("Mean", "CoordinateMedian", "TrimmedMean")
REFUSED = {  # group -> class names that need the whole payload, and why
    "attack": (("MinMax", "Mimic"), "compares whole payloads"),
    "codec": (("DCTTopK", "ChunkTopK"), "chunks whole tensors"),
    "sync": (("Async",), "pushes asynchronously, which runs in one process"),
}


def _cls(node: dict[str, Any] | None) -> str:
    """The class name a plug-in node targets (``diloco.adversary.attacks.ALIE`` -> ALIE)."""
    return str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]


def check_islands(cfg: Config) -> None:
    """One-line errors for what an island of ``workers.ranks_per_worker`` ranks cannot run.

    Checked before any process group is joined or model built.
    """
    r = cfg.workers.ranks_per_worker
    if r == 1:
        return
    islands = f"islands (workers.ranks_per_worker={r})"
    if _cls(cfg.algorithm) != "DiLoCo" or _cls(cfg.codec) == "ChunkTopK":
        raise ConfigError(
            f"algorithm={cfg.algorithm.get('name')}",
            f"{islands} run DiLoCo across islands: algorithm=diloco or fedavg",
        )
    if cfg.train.batch_size % r:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}",
            f"a worker's batch is split among its {r} ranks: use a multiple of {r}",
        )
    if _cls(cfg.aggregator) not in AGGREGATORS:
        raise ConfigError(
            f"aggregator={_cls(cfg.aggregator)}",
            f"needs whole payloads; {islands} aggregate each shard alone: mean, median or "
            "trimmed_mean",
        )
    for group, (names, why) in REFUSED.items():
        name = _cls(getattr(cfg, group))
        if name in names:
            raise ConfigError(f"{group}={name}", f"{why}; {islands} shard every payload")
    if cfg.validator is not None:
        raise ConfigError(
            "validator", f"scores whole pseudo-gradients; {islands} shard every payload"
        )
    if cfg.workers.execution == "batched":
        raise ConfigError(
            "workers.execution=batched", f"{islands} run one worker per engine: use auto"
        )


class _Inner:
    """What the trainer reads of a group's inner optimizer: its rate and a crash reset."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def lr(self) -> float:
        """The current rate of the first parameter group."""
        return self.engine.lr

    def reset(self, row: int) -> None:
        """Forget the worker's inner optimizer state (a crash)."""
        self.engine.reset()


class IslandGroup:
    """This rank's shard of its island's worker, in the shape of a one-row worker group.

    Args:
        model: the initial model, the same on every rank (built from ``seed``).
        comm: the island-aware :class:`diloco.comm.torchdist.TorchDistComm`.
        cfg: the run's config (``island``, ``optimizer``, ``train``, ``workers``).
        optimizer: builds the inner optimizer from parameter groups.
    """

    batched = False
    anchors = None

    def __init__(self, model: nn.Module, comm: Any, cfg: Config, optimizer: Any) -> None:
        self.comm = comm
        self.worker_ids = list(comm.local_ids)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.ranks = cfg.workers.ranks_per_worker
        self.member = comm.member
        engine_cls = ENGINES[cfg.island.engine]
        self.engine: Engine = engine_cls(model, optimizer, comm.mesh, cfg)
        shard = self.engine.local()
        self.global_param = nn.Parameter(shard.clone())
        self.global_param.grad = torch.zeros_like(shard)
        self.inner = _Inner(self.engine)
        self.active = [True]
        self.grad_norms = torch.zeros(1)
        self._pending_norm = 0.0
        # modelled intra-island bytes per rank: (R-1)/R of the model per collective pass
        self._pass = 4.0 * self.num_params * (self.ranks - 1) / self.ranks

    @property
    def size(self) -> int:
        """One worker (this rank's shard of it)."""
        return 1

    @property
    def params(self) -> torch.Tensor:
        """This rank's shard of the worker's parameters, ``[1, P_shard]`` (a copy)."""
        return self.engine.local()[None]

    def forward_backward(self, batches: Sequence[Batch | None]) -> torch.Tensor:
        """This rank's slice of the worker's batch, forward and backward under the engine."""
        (batch,) = batches
        self.active = [batch is not None]
        if batch is None:
            return torch.zeros(0)
        x, y = batch
        per_rank = x.shape[0] // self.ranks
        rows = slice(self.member * per_rank, (self.member + 1) * per_rank)
        loss = self.engine.loss(x[rows], y[rows])
        self.comm.count_intra(self.engine.intra_passes_per_step * self._pass)
        return loss.detach().float().reshape(1)

    def clip_grads(self, max_norm: float) -> torch.Tensor:
        """Clip the island's whole gradient to ``max_norm`` (0: none); returns its norm."""
        if self.active[0]:
            self.grad_norms = torch.tensor([self.engine.clip(max_norm)])
        return self.grad_norms

    def optimizer_step(self, lr_mult: float) -> None:
        """The island's inner optimizer step at ``lr_mult`` times the base rate (if it ran)."""
        self.engine.set_lr(lr_mult)
        if self.active[0]:
            norm = self.engine.step()
            if norm is not None:  # the engine clipped inside its step (DeepSpeed)
                self.grad_norms = torch.tensor([norm])

    def set_lr(self, lr_mult: float) -> None:
        """Set the inner optimizer's rate to ``lr_mult`` times its base rate."""
        self.engine.set_lr(lr_mult)

    def origins(self) -> torch.Tensor:
        """The global model's shard, ``[1, P_shard]``: every island started the round there."""
        return self.global_param.data[None]

    def broadcast_global(self) -> None:
        """Set the island's shard to the global model's."""
        self.pull(None)

    def pull(self, workers: Sequence[int] | None = None) -> None:
        """The island takes the global model (when it is among ``workers``; None: all)."""
        if workers is None or self.worker_ids[0] in workers:
            self.engine.set_local(self.global_param.data)
            self.comm.count_intra(self.engine.intra_passes_per_pull * self._pass)

    def track_origins(self) -> None:
        """Not for islands: asynchronous pushes run in one process (refused by the config)."""
        raise NotImplementedError("islands do not run sync=async")

    @torch.no_grad()
    def evaluate(self, eval_set: Sequence[Batch], is_main: bool) -> float:
        """The global model's eval loss, computed by the first island (returned on rank 0).

        Its ranks all take part (a sharded forward gathers parameters); the island's own
        shard is set aside meanwhile, so an island that missed the last pull is unchanged.
        """
        if self.worker_ids[0] != 0:
            return float("nan")
        own = self.engine.local()
        self.engine.set_local(self.global_param.data)
        total = 0.0
        for x, y in eval_set:
            total += self.engine.eval_loss(x, y) * x.shape[0]
        self.engine.set_local(own)
        if not is_main:
            return float("nan")
        return total / sum(x.shape[0] for x, _ in eval_set)

    def summary(self) -> dict[str, Any]:
        """The island engine and the bytes of training state on this rank (rank 0's)."""
        return {
            "island_engine": type(self.engine).__name__,
            "island_state_bytes_per_rank": self.engine.state_bytes(),
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the global model and the engine's state (its own part)."""
        return {"global": self.global_param.data.clone(), "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "engine" not in state:
            raise ValueError("the checkpoint was not written by an island run")
        self.global_param.data.copy_(state["global"])
        self.engine.load_state_dict(state["engine"])
