"""The round loop: workers run inner steps, the algorithm syncs them, everything is logged.

One round, as data::

    for each of H inner steps:
        group.forward_backward(batches)         K_local workers, each on its own shard
        algorithm.on_gradients(group, exchange) DDP averages gradients here
        group.clip_grads; group.optimizer_step  inner optimizer (AdamW, SGD, ...)
    rows = algorithm.payload(group)             local phase: e.g. pseudo-gradients [K, P]
    update = exchange(rows)                     attack, validation, codec, collective (bytes
                                                counted), aggregation -> [P] fp32
    algorithm.apply(group, update)              outer step; workers resync
    clock: modelled compute (configured or measured per worker) + network time of the
           collectives run (bandwidth, latency; the slowest link bounds each exchange)
    eval, log, checkpoint

The trainer is the only place that owns the run's state, so :meth:`Trainer.state_dict` is a
whole checkpoint and a resumed run ends bitwise equal to an uninterrupted one on CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from demo_optim import DeMo
from diloco import asynchronous, checkpoint
from diloco import metrics as M
from diloco.adversary.poison import PoisonedSampler
from diloco.adversary.validator import Gauntlet
from diloco.algorithms import Algorithm, DiLoCo
from diloco.algorithms.demo import DeMoSync
from diloco.asynchronous import AsyncSchedule
from diloco.clock import SimClock
from diloco.comm import make_comm
from diloco.comm.pipeline import ExchangePipeline
from diloco.config import Config, ConfigError, build, build_optimizer
from diloco.data import Corpus, ShardSampler, load_corpus, shard_indices
from diloco.faults import Faults
from diloco.profiles import worker_profiles
from diloco.sync import steps_per_worker
from diloco.workers import Batch, WorkerGroup, lr_multiplier

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


class Trainer:
    """Owns workers, algorithm, communicator and loggers for one run.

    Args:
        cfg: the validated config.
        run_dir: where ``metrics.jsonl``, ``summary.json`` and checkpoints go.
        corpus: a preloaded corpus (tests and sweeps reuse one); loaded from ``cfg.data``
            when omitted.
    """

    def __init__(self, cfg: Config, run_dir: Path, corpus: Corpus | None = None) -> None:
        self.cfg = cfg
        self.device = parse_device(cfg.device)
        self.comm = make_comm(cfg, self.device)
        if self.comm.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.is_main = self.comm.rank == 0  # evaluates, logs and writes the summary
        self.exchange = ExchangePipeline.from_config(self.comm, cfg)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.corpus = corpus if corpus is not None else load_corpus(cfg.data)
        torch.manual_seed(cfg.seed)
        model = build(
            cfg.model, "model", vocab_size=self.corpus.vocab_size, block_size=cfg.data.seq_len
        ).to(self.device)
        self.local_ids = self.comm.local_ids  # global ids of the workers this process hosts
        self.group = WorkerGroup(model, self.local_ids, build_optimizer(cfg.optimizer, "optimizer"))
        self.algorithm: Algorithm = build(cfg.algorithm, "algorithm", self.group)
        for opt in self.group.optimizers:  # DeMo as a local inner optimizer: no exchange of
            if isinstance(opt, DeMo) and not isinstance(self.algorithm, DeMoSync):  # its own
                opt.gather_fn = lambda payload: [t.unsqueeze(0) for t in payload]
        self.faults = Faults(cfg.faults, cfg.workers.count, cfg.seed)
        uneven = cfg.sync.policy != "all" or cfg.faults.events or cfg.faults.rate
        if uneven and (self.algorithm.inner_steps < 2 or not self.algorithm.uses_exchange):
            key = f"sync={cfg.sync.policy}" if cfg.sync.policy != "all" else "faults"
            raise ConfigError(key, f"needs rounds of local steps, not {cfg.algorithm['name']}")
        defaults = ({"name": "none"}, {"name": "mean"}, {"name": "none"})
        plugins = (cfg.codec, cfg.aggregator, cfg.attack)
        if not self.algorithm.uses_exchange and any(
            p["name"] != d["name"] for p, d in zip(plugins, defaults, strict=True)
        ):
            raise ConfigError(
                f"algorithm={self.algorithm.name}",
                "sends its own payloads; codec, aggregator and attack must stay at their defaults",
            )
        shards = shard_indices(
            self.corpus, cfg.workers.count, cfg.data.shard, cfg.seed, cfg.data.dirichlet_alpha
        )
        # every worker's sampler, so that the validator can read any worker's assigned batch
        self.samplers: list[ShardSampler | PoisonedSampler] = [
            ShardSampler(self.corpus.train, shards[i], cfg.train.batch_size, cfg.seed, i)
            for i in range(cfg.workers.count)
        ]
        if cfg.attack["name"] == "poison":
            mode = cfg.attack.get("mode", "shuffle")
            for i in torch.nonzero(self.exchange.byzantine).flatten().tolist():
                try:
                    self.samplers[i] = PoisonedSampler(
                        self.samplers[i], mode, self.corpus.vocab_size, cfg.seed, i
                    )
                except ValueError as err:
                    raise ConfigError("attack.mode", str(err)) from None
        if cfg.validator.name == "gauntlet":
            self.exchange.validator = self._gauntlet(shards)
        held_out = self.corpus.eval[: cfg.train.eval_sequences].split(EVAL_BATCH)
        self.eval_set = [self._to_device((s[:, :-1], s[:, 1:])) for s in held_out]
        self.assigned: dict[int, Batch] = {}  # each worker's latest assigned batch
        self.step = 0  # reference inner steps (a worker at speed 1 under any sync policy)
        self.worker_steps = torch.zeros(cfg.workers.count, dtype=torch.long)  # steps each ran
        self.round = 0
        self.wall_s = 0.0
        comm = cfg.comm
        self.profiles = worker_profiles(cfg.workers, cfg.seed)
        self.clock = SimClock(
            comm.bandwidth_mbps,
            comm.latency_ms,
            comm.what_if_mbps,
            cfg.workers.step_time_s,
            self.profiles,
        )
        self.schedule: AsyncSchedule | None = None  # sync=async: who pushes next
        if cfg.sync.policy == "async":
            asynchronous.check(cfg, self.algorithm, self.comm.world_size)
            assert cfg.workers.step_time_s is not None
            self.schedule = AsyncSchedule(
                self.algorithm.inner_steps,
                cfg.workers.step_time_s,
                self.profiles.speeds,
                cfg.sync.staleness_exponent,
            )
        self.last_eval: float = float("nan")
        self.ckpt_path = checkpoint.path_for(self.run_dir, self.comm.rank, self.comm.world_size)
        self._start = time.perf_counter()

    def _gauntlet(self, shards: list[torch.Tensor]) -> Gauntlet:
        """The validator: each worker's latest assigned batch and a held-out batch."""
        cfg = self.cfg
        if not isinstance(self.algorithm, DiLoCo):
            raise ConfigError("validator=gauntlet", "scores full pseudo-gradients: use DiLoCo")
        b = cfg.train.batch_size
        spare = self.corpus.eval[cfg.train.eval_sequences : cfg.train.eval_sequences + b]
        if len(spare) == 0:
            spare = self.corpus.eval[:b]
        held = self._to_device((spare[:, :-1], spare[:, 1:]))
        return Gauntlet(
            cfg.validator, self._loss_at, lambda i: self.assigned.get(i, held), held,
            lambda: self.group.global_param.data, self.exchange.byzantine,
        )  # fmt: skip

    @torch.no_grad()
    def _loss_at(self, flat: torch.Tensor, batch: Batch) -> float:
        """The global model's loss on ``batch`` with its parameters set to ``flat``."""
        theta = self.group.global_param.data
        saved = theta.clone()
        theta.copy_(flat)
        loss = float(self.group.global_model(*batch)[1])
        theta.copy_(saved)
        return loss

    def _to_device(self, batch: Batch) -> Batch:
        x, y = batch
        return x.to(self.device), y.to(self.device)

    # -- one round ----------------------------------------------------------------------------

    def _inner_step(self, active: list[bool] | None = None) -> torch.Tensor | None:
        """One reference step: every active worker steps; idle ones wait (deadline sync).

        ``active`` has one entry per worker of the run. Returns this process's sums of loss,
        workers that ran and gradient norm (None when no worker of the run was active).
        """
        tc = self.cfg.train
        active = active or [True] * self.cfg.workers.count
        stats = None
        if any(active):
            scored = self.exchange.validator is not None  # it scores on the data assigned
            local = set(self.local_ids)
            batches: list[Batch | None] = [
                self._to_device(s.next_batch()) if a and (i in local or scored) else None
                for i, (s, a) in enumerate(zip(self.samplers, active, strict=True))
            ]
            if scored:
                for i, (sampler, batch) in enumerate(zip(self.samplers, batches, strict=True)):
                    clean = getattr(sampler, "last_clean", None)  # a poisoner's real data
                    if batch is not None:
                        self.assigned[i] = batch if clean is None else self._to_device(clean)
            losses = self.group.forward_backward([batches[i] for i in self.local_ids])
            self.exchange.round = self.round
            self.algorithm.on_gradients(self.group, self.exchange)
            norms = self.group.clip_grads(tc.grad_clip)
            mult = lr_multiplier(
                self.step, tc.steps, tc.warmup_steps, tc.lr_schedule, tc.min_lr_ratio
            )
            self.algorithm.step_optimizers(self.group, self.comm.all_gather_parts, mult)
            ran = torch.tensor(self.group.active)
            stats = torch.stack(
                [losses.sum(), ran.sum().to(losses), norms[ran].sum().to(losses)]
            ).double()
        self.step += 1
        self.algorithm.after_step(self.group, self.step)
        return stats

    def _train_row(self, stats: torch.Tensor | None) -> dict[str, float]:
        """Train metrics over every worker of the run (one small all-reduce when distributed)."""
        if stats is None:
            return {}
        loss, ran, norm = self.comm.all_reduce_sum(stats).tolist()
        return {
            M.TRAIN_LOSS: loss / ran,
            M.TRAIN_GRAD_NORM: norm / ran,
            M.TRAIN_LR: self.group.optimizers[0].param_groups[0]["lr"],
        }

    def _sync(self, steps: list[int] | None = None) -> None:
        """End a round; ``steps`` each worker ran (None: all the same number)."""
        self.exchange.round = self.round
        if steps is not None and not any(steps):  # everyone absent: nothing to sync
            self.round += 1
            return
        rows = self.algorithm.payload(self.group)
        # under a deadline or with absent workers, payloads are weighted by steps run
        # (``steps`` has one entry per worker of the run)
        uneven = steps is not None and len(set(steps)) > 1
        weights = torch.tensor(steps, dtype=torch.float32) if uneven else None
        key = self.algorithm.payload_key
        update = None if rows is None else self.exchange(rows, key, weights)
        self.algorithm.apply(self.group, update)
        self.round += 1

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss of the global model on the held-out batches.

        Only the main process evaluates (the global model is the same on every process);
        the others return NaN.
        """
        if not self.is_main:
            return float("nan")
        model = self.group.global_model
        was_training = model.training
        model.eval()
        total = sum(model(x, y)[1].item() * x.shape[0] for x, y in self.eval_set)
        model.train(was_training)
        return total / sum(x.shape[0] for x, _ in self.eval_set)

    def _comm_metrics(self) -> dict[str, float]:
        out = {
            M.BYTES_SENT: self.comm.sent.mean().item(),
            M.BYTES_RECV: self.comm.recv.mean().item(),
        }
        if self.exchange.stats.excluded_total:
            out[M.EXCLUDED] = self.exchange.stats.excluded
        if self.exchange.validator is not None:
            out.update(self.exchange.validator.metrics())
        return out

    # -- the run ------------------------------------------------------------------------------

    def fit(self, logger: M.Logger | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` inner steps per worker; returns the summary dict."""
        tc = self.cfg.train
        logger = logger or M.MultiLogger([])
        h = self.algorithm.inner_steps
        self._start = time.perf_counter() - self.wall_s
        if self.schedule is not None:
            asynchronous.fit_async(self, logger)
        while self.schedule is None and self.step < tc.steps:
            n = min(h, tc.steps - self.step)
            now = self.faults.at(self.round)
            for w in now.crashed:  # a crash loses the worker's local optimizer state
                if w in self.local_ids:
                    self.group.optimizers[self.local_ids.index(w)].state.clear()
            speeds = [v / d for v, d in zip(self.profiles.speeds, now.slowdown, strict=True)]
            steps = steps_per_worker(self.cfg.sync.policy, n, speeds, self.cfg.sync.budget)
            steps = [s if here else 0 for s, here in zip(steps, now.present, strict=True)]
            started = time.perf_counter()
            stats = None
            for i in range(n):
                ran = self._inner_step([s > i for s in steps])
                stats = stats if ran is None else ran
                if i < n - 1 and self.step % tc.log_every == 0:
                    logger.log(self._train_row(stats), self.step)
            row = self._train_row(stats)
            here = sum(steps[i] for i in self.local_ids)  # worker-steps timed in this process
            self.clock.compute(steps, time.perf_counter() - started, speeds, here)
            self.worker_steps += torch.tensor(steps)
            self._sync(steps)
            self._end_round(row, n, logger)
        if self.step == 0 or self.last_eval != self.last_eval:  # nothing run, or never evaluated
            self.last_eval = self.evaluate()
        return self.summary()

    def _end_round(
        self, row: dict[str, float], n: int, logger: M.Logger, last: bool | None = None
    ) -> None:
        """After a sync (``n`` reference steps long): metrics, eval, log, checkpoint when due."""
        tc = self.cfg.train
        last = self.step >= tc.steps if last is None else last
        self.wall_s = time.perf_counter() - self._start
        overlap = self.algorithm.overlap_steps
        self.clock.exchange(self.comm.drain(), self.comm.num_workers, overlap)
        row.update(self._comm_metrics())
        row.update(self.clock.metrics())
        row[M.ROUND] = self.round
        row[M.TOKENS] = self.step * tc.batch_size * self.cfg.data.seq_len
        row[M.WALL_S] = self.wall_s
        if self.step // tc.eval_every > (self.step - n) // tc.eval_every or last:
            self.last_eval = row[M.EVAL_LOSS] = self.evaluate()
        h = self.algorithm.inner_steps
        if self.step % tc.log_every == 0 or h >= tc.log_every or M.EVAL_LOSS in row or last:
            logger.log(row, self.step)
        every = self.cfg.checkpoint.every
        if every and (self.round % every == 0 or last):
            distributed = self.comm.world_size > 1
            checkpoint.save(self.state_dict(), self.ckpt_path, keep_previous=distributed)
            self.comm.barrier()

    def summary(self) -> dict[str, Any]:
        """The run's headline numbers (written to ``summary.json``)."""
        return {
            "algorithm": self.algorithm.name,
            "workers": self.cfg.workers.count,
            "inner_steps": self.cfg.algorithm.get("inner_steps", self.algorithm.inner_steps),
            "steps": self.step,
            "rounds": self.round,
            "params": self.group.num_params,
            "tokens_per_worker": self.worker_steps.double().mean().item()
            * self.cfg.train.batch_size
            * self.cfg.data.seq_len,
            "final_eval_loss": self.last_eval,
            "comm_bytes_per_worker": self.comm.sent.mean().item(),
            "comm_bytes_total": self.comm.sent.sum().item(),
            "wall_time_s": self.wall_s,
            **self.clock.summary(),
            **(self.exchange.validator.summary() if self.exchange.validator else {}),
        }

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        return {
            "step": self.step,
            "round": self.round,
            "local_ids": list(self.local_ids),
            "worker_steps": self.worker_steps.clone(),
            "wall_s": self.wall_s,
            "clock": self.clock.state_dict(),
            "last_eval": self.last_eval,
            "group": self.group.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "comm": self.comm.state_dict(),
            "exchange": self.exchange.state_dict(),
            "samplers": [s.state_dict() for s in self.samplers],
            "rng": checkpoint.rng_state(),
            **({"schedule": self.schedule.state_dict()} if self.schedule else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        saved = state.get("local_ids", self.local_ids)
        if saved != self.local_ids:
            raise ConfigError(
                "resume",
                f"the checkpoint holds workers {saved} on this rank, this run places "
                f"{self.local_ids} here: resume with the same workers.count and world size",
            )
        self.step = state["step"]
        self.round = state["round"]
        self.worker_steps.copy_(state["worker_steps"])
        self.wall_s = state["wall_s"]
        self.clock.load_state_dict(state["clock"])
        self.last_eval = state["last_eval"]
        self.group.load_state_dict(state["group"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.comm.load_state_dict(state["comm"])
        self.exchange.load_state_dict(state["exchange"])
        for sampler, s in zip(self.samplers, state["samplers"], strict=True):
            sampler.load_state_dict(s)
        checkpoint.set_rng_state(state["rng"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])

    def maybe_resume(self) -> bool:
        """Load the run dir's checkpoint if there is one; True when resumed.

        Distributed, every rank has its own file and the previous one; the ranks agree on
        the latest step that all of them saved (a rank killed mid-save has the previous).
        """
        state = checkpoint.resume_state(self.run_dir, self.ckpt_path, self.comm, self.local_ids)
        if state is None:
            log.info("resume: no checkpoint in %s, starting from scratch", self.run_dir)
            return False
        self.load_state_dict(state)
        log.info("resumed from %s at step %d (round %d)", self.ckpt_path, self.step, self.round)
        return True
