"""The builder: a validated config becomes the parts of a run, which the trainer receives.

Every plug-in is built from its config node by ``_target_`` (:func:`diloco.config.build`);
each part that constrains others checks them here, in its own ``check``, with a one-line
error naming the key. Order matters only where a part needs another:

    device -> communicator (joins the process group) -> corpus -> model -> worker group
    -> algorithm -> attack (Byzantine mask, poisoned samplers) -> validator -> exchange
    -> clock, sync policy, faults -> checks

A part that constrains the others has ``check(parts)`` (DeMo: the exchange at its defaults;
the validator: whole pseudo-gradients; faults: rounds of local steps); the sync policy's
``setup(parts)`` checks and prepares (the asynchronous schedule tracks what each worker
pulled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diloco.clock import SimClock
from diloco.comm.base import Communicator
from diloco.config import Config, ConfigError, build, build_optimizer
from diloco.data import Corpus, ShardSampler, shard_indices
from diloco.exchange.pipeline import ExchangePipeline
from diloco.faults import Faults
from diloco.profiles import Profiles, worker_profiles
from diloco.sync import Progress, SyncPolicy
from diloco.workers import Batch, WorkerGroup

EVAL_BATCH = 32  # sequences per eval forward; the eval set does not depend on it


def parse_device(name: str) -> torch.device:
    """``device=...`` as a torch device; a bad or unavailable one is a one-line error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name}", "not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}", "CUDA is not available on this machine")
    return device


@dataclass
class Parts:
    """Everything one run is made of (see the module docstring for who builds what)."""

    cfg: Config
    device: torch.device
    comm: Communicator
    corpus: Corpus
    group: WorkerGroup
    algorithm: Any
    exchange: ExchangePipeline
    samplers: list[Any]  # every worker's data sampler (the validator reads any worker's)
    eval_set: list[Batch]
    profiles: Profiles
    clock: SimClock
    policy: SyncPolicy
    faults: Faults
    progress: Progress


def build_comm(cfg: Config) -> tuple[Communicator, torch.device]:
    """The communicator (joining the process group under ``comm=torchdist``) and the device."""
    device = parse_device(cfg.device)
    comm = build(cfg.comm, "comm", num_workers=cfg.workers.count, device=device)
    if comm.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return comm, device


def build_parts(cfg: Config, comm: Communicator, device: torch.device, corpus: Corpus) -> Parts:
    """Every other part of the run, from the config, around ``comm``."""
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, "model", vocab_size=corpus.vocab_size, block_size=cfg.data.seq_len)
    group = WorkerGroup(
        model.to(device), comm.local_ids, build_optimizer(cfg.optimizer, "optimizer")
    )
    algorithm = build(cfg.algorithm, "algorithm", group)
    progress = Progress(cfg.train.steps, cfg.workers.count)

    k = cfg.workers.count
    shards = shard_indices(corpus, k, cfg.data.shard, cfg.seed, cfg.data.dirichlet_alpha)
    attack = build(cfg.attack, "attack")
    byzantine = attack.byzantine_mask(k)
    samplers: list[Any] = []
    for i in range(k):
        sampler = ShardSampler(corpus.train, shards[i], cfg.train.batch_size, cfg.seed, i)
        if byzantine[i]:
            sampler = attack.corrupt_sampler(sampler, i, corpus.vocab_size, cfg.seed)
        samplers.append(sampler)

    def to_device(batch: Batch) -> Batch:
        return batch[0].to(device), batch[1].to(device)

    def assigned(i: int, fallback: Batch) -> Batch:
        """Worker ``i``'s latest assigned batch (a poisoner's clean one), else ``fallback``."""
        last = samplers[i].last_assigned
        return fallback if last is None else to_device(last)

    validator = None
    if cfg.validator is not None:
        b = cfg.train.batch_size
        spare = corpus.eval[cfg.train.eval_sequences : cfg.train.eval_sequences + b]
        if len(spare) == 0:
            spare = corpus.eval[:b]
        held = to_device((spare[:, :-1], spare[:, 1:]))
        validator = build(
            cfg.validator, "validator", _loss_at(group), lambda i: assigned(i, held), held,
            lambda: group.global_param.data, byzantine,
        )  # fmt: skip
    exchange = ExchangePipeline.from_config(
        comm, cfg, attack, validator, round_of=lambda: progress.round
    )

    held_out = corpus.eval[: cfg.train.eval_sequences].split(EVAL_BATCH)
    eval_set = [to_device((s[:, :-1], s[:, 1:])) for s in held_out]
    profiles = worker_profiles(cfg.workers, cfg.seed)
    net = comm.cfg
    clock = SimClock(
        net.bandwidth_mbps, net.latency_ms, net.what_if_mbps, cfg.workers.step_time_s, profiles
    )
    policy = build(
        cfg.sync, "sync", inner_steps=algorithm.inner_steps, profiles=profiles,
        step_time_s=cfg.workers.step_time_s,
    )  # fmt: skip
    faults = Faults(cfg.faults, k, cfg.seed)
    parts = Parts(
        cfg, device, comm, corpus, group, algorithm, exchange, samplers, eval_set,
        profiles, clock, policy, faults, progress,
    )  # fmt: skip
    for part in (algorithm, validator, faults):  # each checks what it imposes on the others
        check = getattr(part, "check", None)
        if check is not None:
            check(parts)
    policy.setup(parts)
    return parts


def _loss_at(group: WorkerGroup) -> Any:
    @torch.no_grad()
    def loss_at(flat: torch.Tensor, batch: Batch) -> float:
        """The global model's loss on ``batch`` with its parameters set to ``flat``."""
        theta = group.global_param.data
        saved = theta.clone()
        theta.copy_(flat)
        loss = float(group.global_model(*batch)[1])
        theta.copy_(saved)
        return loss

    return loss_at
