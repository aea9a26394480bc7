"""The builder: a validated config becomes the parts of a run, which the trainer receives.

Every plug-in is built from its config node by ``_target_`` (:func:`diloco.config.build`);
each part that constrains others checks them here, in its own ``check``, with a one-line
error naming the key. Order matters only where a part needs another:

    device -> communicator (joins the process group) -> corpus -> model -> worker group
    (or, for a worker spanning ranks, :class:`diloco.islands.IslandGroup`)
    -> algorithm -> attack (Byzantine mask, poisoned samplers) -> validator -> exchange
    -> clock, sync policy, faults -> checks

A part that constrains the others has ``check(parts)`` (DeMo: the exchange at its defaults;
the validator: whole pseudo-gradients; faults: rounds of local steps); the sync policy's
``setup(parts)`` checks and prepares (the asynchronous schedule tracks what each worker
pulled).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from diloco.adversary.validator import arrival_times
from diloco.clock import SimClock
from diloco.comm.base import Communicator
from diloco.config import Config, ConfigError, build, build_optimizer
from diloco.data import IGNORE_INDEX, Corpus, ShardSampler, shard_indices
from diloco.exchange.pipeline import ExchangePipeline
from diloco.faults import Faults
from diloco.island_engines import check_engine
from diloco.islands import IslandGroup, check_islands
from diloco.profiles import Profiles, worker_profiles
from diloco.sync import Progress, SyncPolicy
from diloco.workers import Batch, ExecutionError, WorkerGroup

log = logging.getLogger(__name__)
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


def torch_threads(threads: int | None) -> int:
    """Intra-op threads for this process (set by :func:`build_comm`, logged).

    ``workers.threads``, else ``$OMP_NUM_THREADS``, else the cores shared among the processes
    started here (ranks of one node, parallel tests), so that parallel runs do not
    oversubscribe the cores.
    """
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if threads is None and omp.isdigit() and int(omp) > 0:
        threads = int(omp)
    if threads is None:
        here = next(
            (int(os.environ[v]) for v in _PROCESSES_HERE if os.environ.get(v, "").isdigit()), 1
        )
        threads = _cores() // max(1, here)
    return max(1, threads)


def _cores() -> int:
    """CPUs this process may run on (its affinity mask: a Slurm task's or a container's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# processes started on this machine's CPUs at once: ranks of one torchrun, parallel tests
_PROCESSES_HERE = ("LOCAL_WORLD_SIZE", "PYTEST_XDIST_WORKER_COUNT")


def build_comm(cfg: Config, **extra: Any) -> tuple[Communicator, torch.device]:
    """The communicator (joining the process group under ``comm=torchdist``) and the device.

    ``extra``: arguments of the communicator beyond its config (a bucket peer's id).
    """
    check_islands(cfg)  # before the process group is joined
    check_engine(cfg)
    threads = torch_threads(cfg.workers.threads)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.info("torch threads: %d", threads)
    device = parse_device(cfg.device)
    r = cfg.workers.ranks_per_worker
    if r > 1:
        extra["ranks_per_worker"] = r
    comm = build(cfg.comm, "comm", num_workers=cfg.workers.count, device=device, **extra)
    if comm.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return comm, device


def build_parts(
    cfg: Config,
    comm: Communicator,
    device: torch.device,
    corpus: Corpus,
    model: torch.nn.Module | None = None,
) -> Parts:
    """Every other part of the run, from the config, around ``comm``.

    ``model``: the initial model, built already (a pretrained one being fine-tuned,
    :mod:`diloco.finetune`); None builds ``cfg.model`` for the corpus's vocabulary.
    """
    check_corpus(cfg, corpus)
    local = len(comm.local_ids)
    check_memory(cfg, corpus.vocab_size, local, device, model)  # before any allocation
    torch.manual_seed(cfg.seed)
    if model is None:
        model = build(cfg.model, "model", vocab_size=corpus.vocab_size, block_size=cfg.data.seq_len)
    inner = build_optimizer(cfg.optimizer, "optimizer")
    try:
        group: Any = (
            IslandGroup(model.to(device), comm, cfg, inner)
            if cfg.workers.ranks_per_worker > 1
            else WorkerGroup(
                model.to(device), comm.local_ids, inner,
                cfg.workers.execution, cfg.workers.precision, cfg.workers.compile,
            )
        )  # fmt: skip
    except ExecutionError as err:
        raise ConfigError(f"workers.execution={cfg.workers.execution}", str(err)) from None
    algorithm = build(cfg.algorithm, "algorithm", group)
    progress = Progress(cfg.train.steps, cfg.workers.count)

    k = cfg.workers.count
    shards = shard_indices(corpus, k, cfg.data.shard, cfg.seed, cfg.data.dirichlet_alpha)
    attack = build(cfg.attack, "attack")
    byzantine = attack.byzantine_mask(k)
    samplers: list[Any] = []
    for i in range(k):
        sampler = ShardSampler(
            corpus.train, shards[i], cfg.train.batch_size, cfg.seed, i, corpus.train_labels
        )
        if byzantine[i]:
            sampler = attack.corrupt_sampler(sampler, i, corpus.vocab_size, cfg.seed)
        samplers.append(sampler)

    def to_device(batch: Batch) -> Batch:
        return batch[0].to(device), batch[1].to(device)

    def assigned(i: int) -> Batch:
        """Worker ``i``'s latest assigned batches (a poisoner's clean ones), concatenated."""
        recent = samplers[i].recent
        if not recent:
            raise RuntimeError(f"worker {i} sent a payload before drawing any batch")
        return to_device((torch.cat([x for x, _ in recent]), torch.cat([y for _, y in recent])))

    validator = None
    if cfg.validator is not None:
        # fresh batches from the whole training split (never the eval split), own stream
        every = torch.arange(len(corpus.train))
        fresh = ShardSampler(
            corpus.train, every, cfg.train.batch_size, cfg.seed + 1, k, corpus.train_labels
        )
        readers = byzantine & attack.reads_others

        def arrival(p: int) -> torch.Tensor:
            """Modelled arrival of each payload of ``p`` fp32 entries this round."""
            plan = progress.plan
            steps = plan.steps if plan is not None else [1] * k
            speeds = plan.speeds if plan is not None and plan.speeds else [1.0] * k
            started = progress.round >= attack.cfg.start_round
            forging = readers if started else torch.zeros_like(readers)
            upload_s = 8 * 4 * p / (comm.cfg.bandwidth_mbps * 1e6)
            return arrival_times(steps, speeds, forging, cfg.workers.step_time_s or 1.0, upload_s)

        validator = build(
            cfg.validator, "validator", loss_at(group), assigned,
            lambda: to_device(fresh.next_batch()), lambda: group.global_param.data, byzantine,
            arrival, fresh,
        )  # fmt: skip
        for sampler in samplers:  # this round's last batches, for the assignment check
            sampler.remember(min(validator.cfg.own_batches, algorithm.inner_steps))
    exchange = ExchangePipeline.from_config(
        comm, cfg, attack, validator, round_of=lambda: progress.round
    )

    n_eval = cfg.train.eval_sequences
    held_out = corpus.eval[:n_eval].split(EVAL_BATCH)
    targets = corpus.eval_targets()[:n_eval].split(EVAL_BATCH)
    eval_set = [to_device((s[:, :-1], t[:, 1:])) for s, t in zip(held_out, targets, strict=True)]
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


def check_corpus(cfg: Config, corpus: Corpus) -> None:
    """The corpus must give every worker one batch of distinct sequences (and an eval split).

    A ``data.seq_len`` near the corpus length packs it into a handful of sequences, which the
    run would repeat for ever; it is refused here, before any model is built.
    """
    k, b, n = cfg.workers.count, cfg.train.batch_size, len(corpus.train)
    if n < k * b or len(corpus.eval) < 1:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len}, train.batch_size={b}",
            f"the corpus packs into {n} train / {len(corpus.eval)} eval sequences of "
            f"{cfg.data.seq_len + 1} tokens; workers.count={k} x train.batch_size={b} need "
            f"{k * b} (use a smaller data.seq_len or batch, fewer workers, or more text)",
        )


def memory_estimate(cfg: Config, model: torch.nn.Module, vocab_size: int, local: int) -> int:
    """A lower bound on a run's bytes: its parameters and the logits of one step."""
    return sum(_memory_parts(cfg, model, vocab_size, local))


def _memory_parts(
    cfg: Config, model: torch.nn.Module, vocab_size: int, local: int
) -> tuple[int, int]:
    """``(state bytes, logit bytes)`` of :func:`memory_estimate`.

    Each of the ``local`` workers holds parameters and gradients (2 x P fp32; the optimizer's
    state comes on top), the global model P more; a step holds the logits and their gradient
    (2 x batch x seq_len x vocab, 2 bytes each under bf16), for every worker at once in the
    batched path. Activations inside the model are left out: a bound, not a forecast.
    """
    params = sum(p.numel() for p in model.parameters())
    batched = cfg.workers.execution == "batched" or (
        cfg.workers.execution == "auto" and hasattr(model, "batched_loss")
    )
    width = 2 if cfg.workers.precision == "bf16" else 4
    logits = 2 * cfg.train.batch_size * cfg.data.seq_len * vocab_size * (local if batched else 1)
    return 4 * params * (2 * local + 1), width * logits


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(
    cfg: Config,
    vocab_size: int,
    local: int,
    device: torch.device,
    model: torch.nn.Module | None = None,
) -> None:
    """Refuse a run whose :func:`memory_estimate` exceeds the memory free on its device.

    ``model`` is counted when given; else ``cfg.model`` is built on the ``meta`` device to
    count its parameters (nothing allocated), and a model that cannot be built there is not
    checked.
    """
    free = available_memory(device)
    if free is None:
        return
    if model is None:
        try:
            with torch.device("meta"):
                model = build(
                    cfg.model, "model", vocab_size=vocab_size, block_size=cfg.data.seq_len
                )
        except ConfigError:
            raise
        except Exception:  # a model that needs real tensors to build
            return
    states, logits = _memory_parts(cfg, model, vocab_size, local)
    need = states + logits
    if need > free:
        key = f"workers.count={cfg.workers.count}" if states > logits else (
            f"train.batch_size={cfg.train.batch_size}")  # fmt: skip
        raise ConfigError(
            key,
            f"{local} workers of this model and batch need at least {need / 2**30:.1f} GiB "
            f"on {device.type}, {free / 2**30:.1f} GiB is free (use a smaller batch, "
            "data.seq_len or model, or fewer workers per process)",
        )


def loss_at(group: WorkerGroup) -> Any:
    """``loss_at(flat, batch)``: per-sequence losses of the global model with weights ``flat``."""

    @torch.no_grad()
    def loss_at(flat: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-sequence mean token loss ``[B]`` of the global model with parameters ``flat``.

        Targets of -100 (masked prompt tokens and padding) are not counted.
        """
        theta, model = group.global_param.data, group.global_model
        saved, was_training = theta.clone(), model.training
        theta.copy_(flat)
        model.eval()  # no dropout: the score is the loss, not a sample of it
        out = []
        for x, y in zip(batch[0].split(EVAL_BATCH), batch[1].split(EVAL_BATCH), strict=True):
            logits = model(x, y)[0]
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), y.flatten(), reduction="none"
            )
            counted = (y != IGNORE_INDEX).to(ce)
            mean = (ce.view(y.shape) * counted).sum(1) / counted.sum(1).clamp_min(1)
            out.append(mean.double())
        model.train(was_training)
        theta.copy_(saved)
        return torch.cat(out).cpu()

    return loss_at
