"""The engines that run an island's inner steps: torch DDP, FSDP2, DeepSpeed ZeRO 1-3.

An engine owns gradient sync, sharding and mixed precision inside an island of R ranks
(:mod:`diloco.islands`). It exposes this rank's *shard* of the worker as a flat fp32 vector
(:meth:`Engine.local`, :meth:`Engine.set_local`), which is what the rank exchanges with the
same shard of the other islands:

* ``ddp`` (``torch.nn.parallel.DistributedDataParallel``, Li et al., arXiv 2006.15704): every
  rank holds the model; the shard is the slice ``chunk(P, R)[member]`` of the flat
  parameters, and a new shard is all-gathered in the island.
* ``fsdp`` (FSDP2 ``fully_shard``, Zhao et al., arXiv 2304.11277): one unit per block of
  every ``nn.ModuleList`` and one at the root; the shard is the rank's local tensors.
* ``deepspeed`` (ZeRO, Rajbhandari et al., arXiv 1910.02054): stage 1 and 2 partition the
  optimizer state (and gradients), stage 3 the parameters too; the shard is the rank's fp32
  partitions, and a new one is copied into the model's weights as the engine's own step
  does (stage 1/2 all-gather them in the island).

The inner optimizer is the run's ``optimizer=`` (under ZeRO one DeepSpeed can wrap: Adam,
AdamW or Adagrad); gradient clipping is by the island's whole gradient norm,
``g *= min(1, c / (||g|| + 1e-6))``, as in simulation. Intra-island bytes are modelled per
rank in passes of ``(R-1)/R`` of the fp32 model (``intra_passes_per_step``: DDP's ring
all-reduce is 2, FSDP's and ZeRO-3's gather-gather-scatter 3, ZeRO-1/2's reduce-scatter and
all-gather 2; ``intra_passes_per_pull``: the gather of a new model, DDP and ZeRO-1/2).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from diloco.config import Config, ConfigError
from diloco.inner import LoopOptimizers, param_groups

CONF_ISLAND = Path(__file__).resolve().parent.parent / "conf" / "island"
ZERO_OPTIMIZERS = ("Adam", "AdamW", "Adagrad")


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


@torch.no_grad()
def _scatter(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors``."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


class Engine:
    """Common to the engines over a torch optimizer (DDP, FSDP2)."""

    intra_passes_per_step = 2.0
    intra_passes_per_pull = 0.0

    def __init__(self, model: nn.Module, optimizer: Any, mesh: Any, cfg: Config) -> None:
        self.model = model
        self.bf16 = cfg.workers.precision == "bf16"
        self.inner: Any = None

    @property
    def lr(self) -> float:
        """The current rate of the first parameter group."""
        return float(self.inner.lr)

    def set_lr(self, lr_mult: float) -> None:
        """Every parameter group's rate: ``lr_mult`` times its base rate."""
        self.inner.set_lr(lr_mult)

    def _autocast(self) -> Any:
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, torch.bfloat16, enabled=self.bf16)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of this rank's sequences; gradients synced by the engine."""
        for p in self.model.parameters():
            p.grad = None
        with self._autocast():
            _, loss = self.forward(x, y)
        loss.backward()
        return loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        """The wrapped model's forward."""
        return self.model(x, y)

    def clip(self, max_norm: float) -> float:
        """Clip the island's whole gradient to ``max_norm`` (0: none); its norm before."""
        bound = max_norm if max_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), bound)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
        return float(full() if full is not None else norm)

    def step(self) -> float | None:
        """The inner optimizer step (the norm was taken by :meth:`clip`)."""
        self.inner.step([True])
        return None

    def reset(self) -> None:
        """Forget the inner optimizer's state (a crash)."""
        self.inner.reset(0)

    def _held(self) -> list[torch.Tensor]:
        """The tensors of the training state this rank keeps: weights and optimizer state."""
        weights = [getattr(p, "_local_tensor", p) for p in self.model.parameters()]
        states = [v for opt in self.inner.optimizers for entry in opt.state.values()
                  for v in entry.values()]  # fmt: skip
        return weights + [getattr(v, "_local_tensor", v) for v in states]

    def state_bytes(self) -> int:
        """Bytes of the state between steps on this rank (gradients, transient, excluded)."""
        held = {t.data_ptr(): t for t in self._held() if torch.is_tensor(t) and t.numel()}
        return sum(t.numel() * t.element_size() for t in held.values())

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The model's loss on ``x, y`` in eval mode."""
        self.model.eval()
        try:
            with self._autocast():
                return float(self.forward(x, y)[1])
        finally:
            self.model.train()

    def local(self) -> torch.Tensor:
        """This rank's shard of the worker's parameters, flat fp32 (a copy)."""
        raise NotImplementedError

    def set_local(self, shard: torch.Tensor) -> None:
        """Set this rank's shard (every rank of the island at once)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard and its inner optimizer state."""
        return {"shard": self.local(), **self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.set_local(state["shard"])
        self.inner.load_state_dict(state)


class DDPEngine(Engine):
    """Torch DDP over the island: whole model on every rank, gradients all-reduced."""

    intra_passes_per_step = 2.0
    intra_passes_per_pull = 1.0

    def __init__(self, model: nn.Module, optimizer: Any, mesh: Any, cfg: Config) -> None:
        super().__init__(model, optimizer, mesh, cfg)
        from torch.nn.parallel import DistributedDataParallel

        self.group = mesh.get_group("intra")
        self.ranks, self.member = mesh.size(1), mesh.get_local_rank("intra")
        cuda = next(model.parameters()).device.type == "cuda"
        ids = [torch.cuda.current_device()] if cuda else None
        self.ddp = DistributedDataParallel(model, device_ids=ids, process_group=self.group)
        self.params = list(model.parameters())
        size = sum(p.numel() for p in self.params)
        self.bounds = [len(c) for c in torch.arange(size).tensor_split(self.ranks)]
        self.inner = LoopOptimizers([optimizer(param_groups(model))])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        """Through DDP while training (its hooks all-reduce), the bare module in eval."""
        return self.ddp(x, y) if self.model.training else self.model(x, y)

    def local(self) -> torch.Tensor:
        """The slice ``chunk(P, R)[member]`` of the flat parameters."""
        start = sum(self.bounds[: self.member])
        return _flat(self.params)[start : start + self.bounds[self.member]].clone()

    def set_local(self, shard: torch.Tensor) -> None:
        """All-gather the island's slices, then set the whole model on every rank."""
        width = max(self.bounds)
        mine = torch.zeros(width, dtype=shard.dtype, device=shard.device)
        mine[: shard.numel()] = shard
        slices = [torch.empty_like(mine) for _ in range(self.ranks)]
        dist.all_gather(slices, mine, group=self.group)
        flat = torch.cat([s[:n] for s, n in zip(slices, self.bounds, strict=True)])
        _scatter(flat, self.params)


class FSDPEngine(Engine):
    """FSDP2 over the island: parameters, gradients and optimizer state sharded by dim 0."""

    intra_passes_per_step = 3.0
    intra_passes_per_pull = 0.0

    def __init__(self, model: nn.Module, optimizer: Any, mesh: Any, cfg: Config) -> None:
        super().__init__(model, optimizer, mesh, cfg)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.bf16 = False  # FSDP's own policy casts: no autocast on top
        policy = MixedPrecisionPolicy()
        if cfg.workers.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        sub = mesh["intra"]
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=sub, mp_policy=policy)
        fully_shard(model, mesh=sub, mp_policy=policy)
        self.params: list[Any] = list(model.parameters())  # DTensors, sharded on dim 0
        self.inner = LoopOptimizers([optimizer(param_groups(model))])

    def _locals(self) -> list[torch.Tensor]:
        return [p.to_local() for p in self.params]

    def _reshard(self) -> None:
        """Free gathered parameters: a no-grad forward leaves the root unsharded."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The loss in eval mode, then every unit resharded so training reads the shards."""
        try:
            return super().eval_loss(x, y)
        finally:
            self._reshard()

    def local(self) -> torch.Tensor:
        """This rank's local tensors, flat."""
        return _flat(self._locals())

    def set_local(self, shard: torch.Tensor) -> None:
        """Write this rank's local tensors (the next forward gathers them)."""
        self._reshard()
        _scatter(shard, self._locals())

    def state_dict(self) -> dict[str, Any]:
        """Local shards of the parameters and of the optimizer's state (no DTensors)."""
        state = super().state_dict()
        for opt in state["optimizers"]:  # new dicts: the entries are the optimizer's own
            opt["state"] = {
                index: {
                    k: v.to_local().clone() if hasattr(v, "to_local") else v
                    for k, v in entry.items()
                }
                for index, entry in opt["state"].items()
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, the optimizer's state as DTensors like its parameters."""
        from torch.distributed.tensor import DTensor

        params = [p for g in self.inner.optimizers[0].param_groups for p in g["params"]]
        for opt in state["optimizers"]:
            for index, entry in opt["state"].items():
                p = params[index]
                for key, value in entry.items():
                    if torch.is_tensor(value) and value.shape == p.to_local().shape:
                        entry[key] = DTensor.from_local(
                            value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                        )
        super().load_state_dict(state)


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The island's DeepSpeed JSON, completed from ``train`` and ``workers`` (checked)."""
    name = cfg.island.deepspeed_config
    key = f"island.deepspeed_config={name}"
    if name is None:
        raise ConfigError(
            "island.deepspeed_config", "island.engine=deepspeed needs a JSON (island=zero2)"
        )
    path = Path(name) if Path(name).is_absolute() or Path(name).exists() else CONF_ISLAND / name
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(key, f"cannot read it as JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(key, "must be a JSON object")
    for own in ("optimizer", "scheduler"):
        if own in ds:
            raise ConfigError(
                key, f"sets '{own}': the inner optimizer and its schedule are optimizer=, train.*"
            )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(key, f"zero_optimization.stage is {stage!r}; allowed: 1, 2, 3")
    if stage == 3:
        # Outer steps write the fp32 partitions; a "persistent" (never partitioned) small
        # parameter would keep its stale full copy, so every parameter is partitioned.
        threshold = ds["zero_optimization"].setdefault("stage3_param_persistence_threshold", 0)
        if threshold != 0:
            raise ConfigError(
                key, f"stage3_param_persistence_threshold is {threshold!r}; allowed: 0"
            )
    r = cfg.workers.ranks_per_worker
    ds.update(
        train_micro_batch_size_per_gpu=cfg.train.batch_size // r,
        gradient_accumulation_steps=1,
        gradient_clipping=cfg.train.grad_clip,
    )
    if cfg.workers.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def check_engine(cfg: Config) -> None:
    """One-line errors for the engine's own needs, before any process group is joined."""
    if cfg.workers.ranks_per_worker == 1 or cfg.island.engine != "deepspeed":
        return
    deepspeed_config(cfg)
    name = str(cfg.optimizer.get("_target_", "")).rsplit(".", 1)[-1]
    if name not in ZERO_OPTIMIZERS:
        raise ConfigError(
            f"optimizer={name}",
            f"DeepSpeed ZeRO wraps {', '.join(ZERO_OPTIMIZERS)} (torch.optim): use "
            "optimizer=adamw, or island=ddp or fsdp",
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(
            "island.engine=deepspeed", "DeepSpeed is not installed: pip install -e '.[deepspeed]'"
        ) from None


class _IslandMPU:
    """What DeepSpeed asks of a model-parallel unit: the island is its data-parallel group."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.alone: Any = None  # this rank's own group: no model parallelism
        for rank in range(dist.get_world_size()):  # new_group is collective: every rank calls
            single = dist.new_group([rank])
            if rank == dist.get_rank():
                self.alone = single

    def get_data_parallel_group(self) -> Any:
        return self.group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.group)

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self) -> Any:
        return self.alone


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage 1, 2 or 3) over the island, from its JSON config."""

    def __init__(self, model: nn.Module, optimizer: Any, mesh: Any, cfg: Config) -> None:
        super().__init__(model, optimizer, mesh, cfg)
        import deepspeed

        ds = deepspeed_config(cfg)
        self.stage = ds["zero_optimization"]["stage"]
        self.intra_passes_per_step = 3.0 if self.stage == 3 else 2.0
        self.intra_passes_per_pull = 0.0 if self.stage == 3 else 1.0
        self.bf16 = False  # the engine casts
        with _quiet():
            engine, zero, _, _ = deepspeed.initialize(
                model=model,
                optimizer=optimizer(param_groups(model)),
                config=ds,
                mpu=_IslandMPU(mesh.get_group("intra")),
                dist_init_required=False,
            )
        self.engine, self.zero = engine, zero
        self.base: torch.optim.Optimizer = zero.optimizer  # the torch optimizer ZeRO steps
        for g in self.base.param_groups:
            g.setdefault("initial_lr", g["lr"])

    @property
    def lr(self) -> float:
        """The current rate of the first parameter group."""
        return float(self.base.param_groups[0]["lr"])

    def set_lr(self, lr_mult: float) -> None:
        """Every parameter group's rate: ``lr_mult`` times its base rate."""
        for g in self.base.param_groups:
            g["lr"] = g["initial_lr"] * lr_mult

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward through the engine (it reduces the gradients)."""
        _, loss = self.engine(x, y)
        self.engine.backward(loss)
        return loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        """The engine's forward (ZeRO-3 gathers the parameters)."""
        return self.engine(x, y)

    def clip(self, max_norm: float) -> float:
        """Clipping happens inside the engine's step (``gradient_clipping``)."""
        return float("nan")

    def step(self) -> float:
        """The engine's step: clip by the island's norm, step, refresh the weights."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def reset(self) -> None:
        """Forget the inner optimizer's state (a crash)."""
        self.base.state.clear()

    def _held(self) -> list[torch.Tensor]:
        """The module's weights (ZeRO-3: this rank's partitions), fp32 masters, their state."""
        weights = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        states = [v for m in self._masters() for v in self.base.state.get(m, {}).values()]
        return weights + self._masters() + states

    def _masters(self) -> list[torch.Tensor]:
        """This rank's fp32 partitions, which the base optimizer steps."""
        if self.stage == 3:
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)

    def local(self) -> torch.Tensor:
        """This rank's fp32 partitions, flat (padding included)."""
        return _flat(self._masters())

    @torch.no_grad()
    def set_local(self, shard: torch.Tensor) -> None:
        """Write the fp32 partitions, then the model's weights from them (as a step does)."""
        _scatter(shard, self._masters())
        zero = self.zero
        if self.stage == 3:
            for i in range(len(zero.fp32_partitioned_groups_flat)):
                zero._reassign_or_swap_out_partitioned_parameters(i)
            return
        from deepspeed.runtime.utils import all_gather_dp_groups

        part = dist.get_rank(zero.dp_process_group)
        for i, master in enumerate(zero.single_partition_of_fp32_groups):
            zero.parallel_partitioned_bit16_groups[i][part].data.copy_(master.data)
        all_gather_dp_groups(
            groups_flat=zero.bit16_groups_flat,
            partitioned_param_groups=zero.parallel_partitioned_bit16_groups,
            dp_process_group=zero.real_dp_process_group,
            start_alignment_factor=zero.nccl_start_alignment_factor,
            allgather_bucket_size=zero.allgather_bucket_size,
        )
        for i in range(len(zero.bit16_groups)):
            zero._update_model_bit16_weights(i)

    def state_dict(self) -> dict[str, Any]:
        """This rank's fp32 partitions and the base optimizer's state of each.

        Read per partition: ZeRO-3 empties the base optimizer's groups between steps, so
        ``state_dict()`` of the base optimizer would not find its state.
        """
        states = [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in self.base.state[m].items()}
            for m in self._masters()
        ]
        return {"shard": self.local(), "states": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.set_local(state["shard"])
        for master, saved in zip(self._masters(), state["states"], strict=True):
            self.base.state[master] = {
                k: v.clone() if torch.is_tensor(v) else v for k, v in saved.items()
            }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DeepSpeed logs its whole config at INFO on every rank: keep it to warnings."""
    import logging

    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


ENGINES: dict[str, type[Engine]] = {
    "ddp": DDPEngine,
    "fsdp": FSDPEngine,
    "deepspeed": DeepSpeedEngine,
}
