"""The one round loop: workers run inner steps, the exchange syncs them, everything is logged.

One round, as data (the module that owns each step)::

    plan = policy.plan(progress, faults)        sync.py / asynchronous.py: who runs how many
                                                steps, whose payload counts, its weight
    for each of the round's inner steps:
        group.forward_backward(batches)         workers.py: K_local workers, own shards
        algorithm.inner_step(group, ctx)        algorithms/: clip + inner optimizer; DDP
                                                averages gradients, DeMo exchanges here
    payload = algorithm.payload(group)          local phase: e.g. pseudo-gradients [K, P]
    update = exchange(payload.rows, ...)        exchange/: codec, collective (comm/: bytes
                                                counted), attack, validation, validator,
                                                aggregation -> [P] fp32
    algorithm.apply(group, update * scale)      outer step; workers resync (pull)
    policy.finish(...)                          clock.py: modelled compute + network time
    eval, log (metrics.py), checkpoint (checkpoint.py)

The trainer receives its parts from :mod:`diloco.build` and names none of them: a new sync
policy, transport, codec, attack or algorithm is a module plus a config file. It is the only
place that owns the run's state, so :meth:`Trainer.state_dict` is a whole checkpoint and a
resumed run ends bitwise equal to an uninterrupted one on CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from diloco import checkpoint
from diloco import metrics as M
from diloco.algorithms import StepContext
from diloco.build import Parts, build_comm, build_parts
from diloco.config import Config, ConfigError
from diloco.data import Corpus, load_corpus
from diloco.sync import RoundEnd, RoundPlan
from diloco.workers import Batch, lr_multiplier

log = logging.getLogger(__name__)


class Trainer:
    """Runs the round loop over the parts of one run.

    Args:
        parts: built by :func:`diloco.build.build_parts` (or use :meth:`from_config`).
        run_dir: where ``metrics.jsonl``, ``summary.json`` and checkpoints go.
    """

    def __init__(self, parts: Parts, run_dir: Path) -> None:
        self.parts = parts
        self.cfg = parts.cfg
        self.comm, self.group, self.algorithm = parts.comm, parts.group, parts.algorithm
        self.exchange, self.policy, self.clock = parts.exchange, parts.policy, parts.clock
        self.progress, self.samplers = parts.progress, parts.samplers
        self.device = parts.device
        self.local_ids = self.comm.local_ids  # global ids of the workers this process hosts
        self.is_main = self.comm.rank == 0  # evaluates, logs and writes the summary
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.wall_s = 0.0
        self.last_eval: float = float("nan")  # NaN off the main process
        self.evaluated = False  # the same on every process (an eval may be collective)
        self.ckpt_path = checkpoint.path_for(self.run_dir, self.comm.rank, self.comm.world_size)
        self._start = time.perf_counter()

    @classmethod
    def from_config(cls, cfg: Config, run_dir: Path, corpus: Corpus | None = None) -> Trainer:
        """Build every part from ``cfg`` (``corpus``: preloaded, else from ``cfg.data``).

        Under ``comm=torchdist`` this joins the process group; the run dir is rank 0's.
        """
        comm, device = build_comm(cfg)
        try:
            run_dir = comm.shared_path(Path(run_dir))
            corpus = corpus if corpus is not None else load_corpus(cfg.data)
            return cls(build_parts(cfg, comm, device, corpus), run_dir)
        except BaseException:
            comm.close()
            raise

    # the run's counters live in the shared progress
    @property
    def step(self) -> int:
        """Reference inner steps done (a worker at speed 1 under any sync policy)."""
        return self.progress.step

    @property
    def round(self) -> int:
        """Rounds done."""
        return self.progress.round

    @property
    def worker_steps(self) -> torch.Tensor:
        """Inner steps each worker of the run has run."""
        return self.progress.worker_steps

    def _to_device(self, batch: Batch) -> Batch:
        x, y = batch
        return x.to(self.device), y.to(self.device)

    # -- one round ----------------------------------------------------------------------------

    def _inner_step(self, active: list[bool] | None = None, step: int | None = None) -> Any:
        """One inner step of every active worker (idle ones wait) at schedule step ``step``.

        ``active`` has one entry per worker of the run (None: all); ``step`` defaults to
        the reference step, which then advances. Returns this process's sums of loss,
        workers that ran and gradient norm (None when no worker of the run was active).
        """
        tc = self.cfg.train
        active = active or [True] * self.cfg.workers.count
        advance = step is None
        step = self.progress.step if step is None else step
        # the validator scores every worker's payload on the data it was assigned, so with
        # one every process draws every worker's batch (samplers remember the last few)
        scored = self.exchange.validator is not None
        local = set(self.local_ids)
        batches: list[Batch | None] = [
            self._to_device(s.next_batch()) if a and (i in local or scored) else None
            for i, (s, a) in enumerate(zip(self.samplers, active, strict=True))
        ]
        losses = self.group.forward_backward([batches[i] for i in self.local_ids])
        mult = lr_multiplier(step, tc.steps, tc.warmup_steps, tc.lr_schedule, tc.min_lr_ratio)
        ctx = StepContext(
            self.exchange, self.comm.all_gather_parts, mult, tc.grad_clip, step + 1, any(active)
        )
        self.algorithm.inner_step(self.group, ctx)
        if advance:
            self.progress.step += 1
        if not any(active):
            return None
        ran = torch.tensor(self.group.active)
        norms = self.group.grad_norms
        return torch.stack(
            [losses.sum(), ran.sum().to(losses), norms[ran].sum().to(losses)]
        ).double()

    def _train_row(self, stats: torch.Tensor | None) -> dict[str, float]:
        """Train metrics over every worker of the run (one small all-reduce when distributed)."""
        if stats is None:
            return {}
        loss, ran, norm = self.comm.all_reduce_sum(stats).tolist()
        return {
            M.TRAIN_LOSS: loss / ran,
            M.TRAIN_GRAD_NORM: norm / ran,
            M.TRAIN_LR: self.group.inner.lr,
        }

    def _sync(self, steps: list[int] | None = None, plan: RoundPlan | None = None) -> int:
        """End a round: payload, exchange, apply. ``steps`` each worker ran (None: equal).

        Returns the inner steps the exchange overlaps (hidden in modelled time).
        """
        if steps is not None and not any(steps):  # everyone absent: nothing to sync
            self.progress.round += 1
            return 0
        weights = None if plan is None else plan.weights
        if plan is None and steps is not None and len(set(steps)) > 1:
            weights = torch.tensor(steps, dtype=torch.float32)
        senders = None if plan is None else plan.senders
        payload = self.algorithm.payload(self.group)
        update = None
        if payload is not None:
            update = self.exchange(payload.rows, payload.key, weights, senders)
            if plan is not None and plan.scale != 1.0:
                update = update * plan.scale
        self.algorithm.apply(self.group, update, senders)
        self.progress.round += 1
        return 0 if payload is None else payload.overlap_steps

    def _round(self, plan: RoundPlan, logger: M.Logger) -> None:
        """Run one planned round: inner steps, exchange, modelled time, eval, log, checkpoint."""
        log_every = self.cfg.train.log_every
        self.progress.plan = plan
        started = time.perf_counter()
        stats = None
        for j in range(plan.length):
            ran = self._inner_step([s > j for s in plan.steps], plan.first_step + j)
            stats = stats if ran is None else ran
            done = plan.first_step + j + 1
            if plan.log_inner and j < plan.length - 1 and done % log_every == 0:
                logger.log(self._train_row(stats), done)
        measured_s = time.perf_counter() - started
        row = self._train_row(stats)
        row.update(plan.metrics)
        here = sum(plan.steps[i] for i in self.local_ids)  # worker-steps timed in this process
        self.progress.worker_steps += torch.tensor(plan.steps)
        overlap = self._sync(plan.steps, plan)
        before = self.progress.step
        end = RoundEnd(self.progress, self.clock, self.comm, measured_s, here, overlap)
        step, last = self.policy.finish(plan, end)
        self.progress.step = step
        self._end_round(row, step - before, logger, last)

    def evaluate(self) -> float:
        """Mean loss of the global model on the held-out batches (NaN off the main process).

        The worker group evaluates (:meth:`diloco.workers.WorkerGroup.evaluate`): the global
        model is the same on every process, so only the main one computes, unless the model
        is sharded over an island's ranks, which then all take part.
        """
        return self.group.evaluate(self.parts.eval_set, self.is_main)

    def _comm_metrics(self) -> dict[str, float]:
        out = {
            M.BYTES_SENT: self.comm.sent.mean().item(),
            M.BYTES_RECV: self.comm.recv.mean().item(),
        }
        out.update(self.comm.metrics())
        if self.exchange.stats.excluded_total:
            out[M.EXCLUDED] = self.exchange.stats.excluded
        if self.exchange.validator is not None:
            out.update(self.exchange.validator.metrics())
        return out

    # -- the run ------------------------------------------------------------------------------

    def fit(self, logger: M.Logger | None = None, until: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` inner steps per worker; returns the summary dict.

        ``until``: stop after the round that reaches this reference step (a competition
        trains its miners epoch by epoch); a later ``fit`` continues exactly.
        """
        logger = logger or M.MultiLogger([])
        self._start = time.perf_counter() - self.wall_s
        while until is None or self.step < until:
            now = self.parts.faults.at(self.round)
            for w in now.crashed:  # a crash loses the worker's local optimizer state
                if w in self.local_ids:
                    self.group.inner.reset(self.local_ids.index(w))
            plan = self.policy.plan(self.progress, now)
            if plan is None:
                break
            self._round(plan, logger)
        else:
            return self.summary()  # stopped at ``until``
        if self.step == 0 or not self.evaluated:  # nothing run, or never evaluated
            self.last_eval = self.evaluate()
            self.evaluated = True
        return self.summary()

    def _end_round(self, row: dict[str, float], n: int, logger: M.Logger, last: bool) -> None:
        """After a round (``n`` reference steps long): metrics, eval, log, checkpoint when due."""
        tc = self.cfg.train
        self.wall_s = time.perf_counter() - self._start
        row.update(self._comm_metrics())
        row.update(self.clock.metrics())
        row[M.ROUND] = self.round
        row[M.TOKENS] = self.step * tc.batch_size * self.cfg.data.seq_len
        row[M.WALL_S] = self.wall_s
        if self.step // tc.eval_every > (self.step - n) // tc.eval_every or last:
            self.last_eval = row[M.EVAL_LOSS] = self.evaluate()
            self.evaluated = True
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
        validator = self.exchange.validator
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
            "execution": "batched" if self.group.batched else "loop",
            "torch_threads": torch.get_num_threads(),
            **self.clock.summary(),
            **(validator.summary() if validator is not None else {}),
            **self.comm.summary(),  # islands: bytes per worker over its ranks, per rank
            **self.group.summary(),
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
            "evaluated": self.evaluated,
            "group": self.group.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "comm": self.comm.state_dict(),
            "exchange": self.exchange.state_dict(),
            "samplers": [s.state_dict() for s in self.samplers],
            "rng": checkpoint.rng_state(),
            "policy": self.policy.state_dict(),
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
        self.progress.step = state["step"]
        self.progress.round = state["round"]
        self.worker_steps.copy_(state["worker_steps"])
        self.wall_s = state["wall_s"]
        self.clock.load_state_dict(state["clock"])
        self.last_eval = state["last_eval"]
        self.evaluated = state.get("evaluated", state["last_eval"] == state["last_eval"])
        try:
            self.group.load_state_dict(state["group"])
        except ValueError as err:  # the checkpoint's inner optimizer has the other form
            raise ConfigError("resume", str(err)) from None
        self.algorithm.load_state_dict(state["algorithm"])
        self.comm.load_state_dict(state["comm"])
        self.exchange.load_state_dict(state["exchange"])
        for sampler, s in zip(self.samplers, state["samplers"], strict=True):
            sampler.load_state_dict(s)
        checkpoint.set_rng_state(state["rng"])
        # checkpoints written before sync policies had state kept async's as "schedule"
        self.policy.load_state_dict(state.get("policy", state.get("schedule", {})))

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
