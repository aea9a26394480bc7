"""Model competitions: ``python -m diloco.compete [overrides]`` (``conf/compete.yaml``).

Bittensor's SN9 "pre-training" and its fork SN29 "Coldint" pay miners who train models on
their own; validators evaluate every submission on the same fresh batches of a fixed dataset
and reward relative performance (:mod:`diloco.competition` has the rules). Here:

    for each epoch:
        every miner trains steps_per_epoch steps its own way       (a Trainer per miner:
                                                                    any run of diloco.train)
        and submits its model (content hash, modelled time)       compute FLOPs / flops_per_s
        copiers re-submit the last leader's weights               exact, noised, fine-tuned
        the validator: fresh held-out batches -> losses -> copy flags -> win rates with the
        time-priority margin -> rewards (sum to 1); metrics.jsonl row; checkpoint

Miner ``i`` runs what ``python -m diloco.train <base> seed=<seed+i> <its overrides>`` would
(``miners`` lists them; ``sample`` draws more from a space). ``summary.json`` has each
miner's final loss, reward, mean reward over epochs and flags; ``competition.png`` plots
loss and reward over epochs and the best loss against the compute spent by all miners.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diloco import checkpoint
from diloco import metrics as M
from diloco.build import build_comm, build_parts, loss_at
from diloco.competition import Submission, copy_flags, rewards, win_rates
from diloco.compose import CONF_DIR, one_line, run_cli
from diloco.config import ConfigError, from_dict
from diloco.data import DataError, ShardSampler, load_corpus
from diloco.miners import CompeteConfig, CopierConfig, miner_configs, subset
from diloco.trainer import Trainer

log = logging.getLogger("diloco")


class Competition:
    """Miners, copiers and the validator of one competition (see the module docstring)."""

    def __init__(self, cc: CompeteConfig, run_dir: Path) -> None:
        self.cc, self.run_dir = cc, run_dir
        self.names, cfgs, fractions = miner_configs(cc)  # every check before any data
        corpus = load_corpus(cfgs[0].data)
        self.corpus = corpus
        self.trainers: list[Trainer] = []
        for i, (name, cfg, frac) in enumerate(zip(self.names, cfgs, fractions, strict=False)):
            mine = subset(corpus, frac, cfg.seed)
            need = cfg.workers.count * cfg.train.batch_size
            if len(mine.train) < need:
                raise ConfigError(
                    f"miners[{i}].data_fraction={frac}",
                    f"{len(mine.train)} of {len(corpus.train)} training sequences; miner "
                    f"{name} needs at least workers.count x train.batch_size = {need}",
                )
            comm, device = build_comm(cfg)
            self.trainers.append(Trainer(build_parts(cfg, comm, device, mine), run_dir / name))
        self.archs = [json.dumps([c.model, corpus.vocab_size], sort_keys=True) for c in cfgs]
        every = torch.arange(len(corpus.train))
        self.copy_data = [
            ShardSampler(corpus.train, every, cfgs[0].train.batch_size, cc.seed, 10_000 + j)
            for j in range(len(cc.copiers))
        ]
        self.epoch = 0
        self.latest: dict[str, Submission] = {}
        self.history: list[Submission] = []
        self.rows: list[dict[str, Any]] = []
        self.bytes = 0  # every new submission: uploaded once, downloaded by the validator

    # -- miners ---------------------------------------------------------------------------------

    def _flops(self, i: int) -> float:
        t = self.trainers[i]
        tc = t.cfg.train
        tokens = t.worker_steps.double().sum().item() * tc.batch_size * t.cfg.data.seq_len
        return 6.0 * t.group.num_params * tokens

    def _upload_s(self, params: torch.Tensor) -> float:
        return 4 * params.numel() * 8 / (self.cc.bandwidth_mbps * 1e6)

    def _train_and_submit(self, i: int, logger: M.Logger) -> None:
        t, name = self.trainers[i], self.names[i]
        t.fit(logger, until=(self.epoch + 1) * self.cc.steps_per_epoch)
        params = t.group.global_param.data.detach().cpu().clone()
        sub = Submission(name, self.epoch, 0.0, params, self.archs[i])
        old = self.latest.get(name)
        if old is not None and old.digest == sub.digest:
            return  # unchanged: the earlier submission (and its time) stands
        sub.time_s = self._flops(i) / self.cc.flops_per_s + self._upload_s(params)
        self.latest[name] = sub
        self.bytes += 2 * 4 * params.numel()

    def _copy(self, j: int, leader: Submission) -> Submission:
        """Copier ``j``'s re-submission of ``leader`` (download, perhaps change, upload)."""
        c = self.cc.copiers[j]
        params = leader.params.clone()
        extra_s = 0.0
        if c.mode == "noise":
            gen = torch.Generator().manual_seed(self.cc.seed * 1_000_003 + 7 * self.epoch + j)
            rms = params.pow(2).mean().sqrt()
            params += c.noise * rms * torch.randn(params.shape, generator=gen)
        elif c.mode == "finetune":
            i = self.archs.index(leader.arch)
            params = self._finetune(i, params, c, self.copy_data[j])
            tc = self.trainers[i].cfg
            tokens = c.steps * tc.train.batch_size * tc.data.seq_len
            extra_s = 6.0 * params.numel() * tokens / self.cc.flops_per_s
        time_s = leader.time_s + 2 * self._upload_s(params) + extra_s  # download, then upload
        return Submission(c.name, self.epoch, time_s, params, leader.arch, source=leader.miner)

    def _finetune(
        self, i: int, params: torch.Tensor, c: CopierConfig, data: ShardSampler
    ) -> torch.Tensor:
        """``c.steps`` AdamW steps of miner ``i``'s architecture from ``params``."""
        t = self.trainers[i]
        model = copy.deepcopy(t.group.global_model).requires_grad_(True)
        torch.nn.utils.vector_to_parameters(params.to(t.device), model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr)
        model.train()
        for _ in range(c.steps):
            x, y = data.next_batch()
            _, loss = model(x.to(t.device), y.to(t.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu()

    # -- the validator --------------------------------------------------------------------------

    def _batches(self) -> torch.Tensor:
        """This epoch's fresh held-out sequences ``[n, T + 1]`` (seeded by seed and epoch)."""
        held = self.corpus.eval
        n = self.cc.eval_batches * self.cc.eval_batch_size
        gen = torch.Generator().manual_seed(self.cc.seed * 1_000_033 + self.epoch)
        if n <= len(held):
            return held[torch.randperm(len(held), generator=gen)[:n]]
        return held[torch.randint(len(held), (n,), generator=gen)]

    def _losses(self, sub: Submission, seqs: torch.Tensor) -> torch.Tensor:
        """``[eval_batches]`` mean token loss of ``sub`` on each batch."""
        t = self.trainers[self.archs.index(sub.arch)]
        x, y = seqs[:, :-1].to(t.device), seqs[:, 1:].to(t.device)
        per_seq = loss_at(t.group)(sub.params.to(t.device), (x, y))  # one swap of the weights
        return per_seq.view(self.cc.eval_batches, self.cc.eval_batch_size).mean(1)

    def _judge(self) -> dict[str, Any]:
        """Score this epoch's submissions: losses, flags, win rates, rewards; one row."""
        subs = [self.latest[n] for n in self.names if n in self.latest]
        seqs = self._batches()
        losses = torch.stack([self._losses(s, seqs) for s in subs])
        flags = [copy_flags(s, self.history + subs, self.cc.detect) for s in subs]
        eligible = torch.tensor([not (f and self.cc.detect.exclude) for f in flags])
        times = torch.tensor([s.time_s for s in subs], dtype=torch.float64)
        rates = torch.zeros(len(subs), dtype=torch.float64)
        rates[eligible] = win_rates(losses[eligible], times[eligible], self.cc.reward.margin)
        shares = rewards(rates, eligible, self.cc.reward)
        row: dict[str, Any] = {"epoch": self.epoch + 1, "miners": {}}
        for s, lo, f, r, w in zip(subs, losses.mean(1), flags, rates, shares, strict=True):
            row["miners"][s.miner] = {
                "loss": lo.item(), "win_rate": r.item(), "reward": w.item(), "flags": f,
                "time_s": s.time_s, "source": s.source, "digest": s.digest[:16],
            }  # fmt: skip
        ok = [lo.item() for lo, e in zip(losses.mean(1), eligible, strict=True) if e]
        row["best_loss"] = min(ok) if ok else float("nan")
        row["flops_total"] = sum(self._flops(i) for i in range(len(self.trainers)))
        row["bytes_total"] = self.bytes
        return row

    # -- the competition ------------------------------------------------------------------------

    def _leader(self) -> str | None:
        """The miner best rewarded at the last evaluation (a copier's source, if it led)."""
        if not self.rows:
            return None
        last = self.rows[-1]["miners"]
        name = max(last, key=lambda n: (last[n]["reward"], -last[n]["loss"]))
        return last[name]["source"] or name

    def run(self, logger: M.Logger, on_epoch: Callable[[int], None] | None = None) -> None:
        """Every remaining epoch; ``on_epoch(epoch)`` after each one's checkpoint."""
        miner_logs = [
            M.JsonlLogger(t.run_dir / "metrics.jsonl", t.step if self.epoch else None)
            for t in self.trainers
        ]
        try:
            while self.epoch < self.cc.epochs:
                leader = self._leader()
                for i in range(len(self.trainers)):
                    self._train_and_submit(i, miner_logs[i])
                if leader is not None:  # copiers copy what the last winner submitted now
                    copied = self.latest[leader]
                    for j, c in enumerate(self.cc.copiers):
                        self.latest[c.name] = self._copy(j, copied)
                        self.bytes += 3 * 4 * copied.params.numel()  # +1: its download
                row = self._judge()
                self.history = [
                    s for s in self.history if s.epoch > self.epoch - self.cc.detect.history
                ] + [s for s in self.latest.values() if s.epoch == self.epoch]
                self.rows.append(row)
                self.epoch += 1
                logger.log(flat_row(row), self.epoch)
                checkpoint.save(self.state_dict(), self.run_dir / "competition.pt")
                if on_epoch is not None:
                    on_epoch(self.epoch)
        finally:
            for m in miner_logs:
                m.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the competition exactly."""
        return {
            "epoch": self.epoch,
            "miners": [t.state_dict() for t in self.trainers],
            "latest": {n: s.state_dict() for n, s in self.latest.items()},
            "history": [s.state_dict() for s in self.history],
            "rows": self.rows,
            "bytes": self.bytes,
            "copy_data": [s.state_dict() for s in self.copy_data],
            "rng": checkpoint.rng_state(),
            "config": fingerprint(self.cc),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.epoch = state["epoch"]
        for t, s in zip(self.trainers, state["miners"], strict=True):
            t.load_state_dict(s)
        self.latest = {n: Submission(**s) for n, s in state["latest"].items()}
        self.history = [Submission(**s) for s in state["history"]]
        self.rows = state["rows"]
        self.bytes = state["bytes"]
        for sampler, s in zip(self.copy_data, state["copy_data"], strict=True):
            sampler.load_state_dict(s)
        checkpoint.set_rng_state(state["rng"])

    def summary(self) -> dict[str, Any]:
        """Final loss, reward, mean reward over epochs and flags of every miner.

        ``final_loss`` is the validator's loss on the last epoch's fresh batches; ``eval_loss``
        the miner's own model on the fixed eval set of ``diloco.train`` (comparable with any
        run's ``final_eval_loss``; None for copiers).
        """
        last = self.rows[-1]["miners"]
        out = {}
        held_out = {n: t.last_eval for n, t in zip(self.names, self.trainers, strict=False)}
        params = {n: t.group.num_params for n, t in zip(self.names, self.trainers, strict=False)}
        for name in self.names:
            got = [r["miners"].get(name, {}) for r in self.rows]
            out[name] = {
                "final_loss": last.get(name, {}).get("loss"),
                "eval_loss": held_out.get(name),  # the fixed eval set of diloco.train
                "params": params.get(name),
                "reward": last.get(name, {}).get("reward", 0.0),
                "mean_reward": sum(g.get("reward", 0.0) for g in got) / len(self.rows),
                "flags": sorted({f for g in got for f in g.get("flags", [])}),
                "copier": name in {c.name for c in self.cc.copiers},
            }
        paid = [n for n in out if out[n]["reward"] > 0]  # none when every one was flagged
        best = min(
            (n for n in last if not last[n]["flags"]), key=lambda n: last[n]["loss"], default=None
        )
        return {
            "epochs": self.epoch, "miners": out,
            "winner": max(paid, key=lambda n: out[n]["reward"]) if paid else None,
            "best_miner": best,
            **{k: self.rows[-1][k] for k in ("best_loss", "flops_total", "bytes_total")},
            "reward_rule": dataclasses.asdict(self.cc.reward),
        }  # fmt: skip


def fingerprint(cc: CompeteConfig) -> dict[str, Any]:
    """The settings a resumed competition must share with the one it continues.

    ``epochs`` too: it sets every miner's ``train.steps``, hence its learning-rate schedule.
    """
    keep = dataclasses.asdict(cc)
    for key in ("resume", "logger"):
        keep.pop(key)
    return keep


def first_difference(a: Any, b: Any, key: str = "") -> str | None:
    """The first dotted key (``miners[1].overrides``) where ``a`` and ``b`` differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{key}.{k}".lstrip(".")
            found = first_difference(a[k], b[k], f"{key}.{k}")
            if found is not None:
                return found.lstrip(".")
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{key}[{i}]")
            if found is not None:
                return found
        return None
    return None if a == b else key or "config"


def check_resumable(state: dict[str, Any], cc: CompeteConfig, run_dir: Path) -> None:
    """A one-line error when ``state`` was written by a competition with other settings."""
    key = first_difference(state.get("config", {}), fingerprint(cc))
    if key is not None:
        raise ConfigError(
            f"resume: {key}",
            f"differs from the competition checkpointed in {run_dir}; resume with the same "
            "settings (start a new hydra.run.dir for other ones)",
        )


def flat_row(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl / W&B row: ``loss/<miner>``, ``reward/<miner>``, the best loss, compute."""
    out: dict[str, float] = {
        "epoch": row["epoch"], M.EVAL_LOSS: row["best_loss"],
        "compute/flops_total": row["flops_total"], "comm/bytes_total": row["bytes_total"],
    }  # fmt: skip
    for name, m in row["miners"].items():
        out[f"loss/{name}"] = m["loss"]
        out[f"reward/{name}"] = m["reward"]
        out[f"win_rate/{name}"] = m["win_rate"]
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss and reward of each miner over epochs; best loss against all miners' compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = sorted({n for r in rows for n in r["miners"]})
    for name in names:
        pts = [(r["epoch"], r["miners"][name]) for r in rows if name in r["miners"]]
        axes[0].plot([e for e, _ in pts], [m["loss"] for _, m in pts], marker="o", label=name)
        axes[1].plot([e for e, _ in pts], [m["reward"] for _, m in pts], marker="o", label=name)
    axes[2].plot([r["flops_total"] for r in rows], [r["best_loss"] for r in rows], marker="o")
    labels = [("epoch", "validator loss"), ("epoch", "reward"), ("FLOPs, all miners", "best loss")]
    for ax, (x, y) in zip(axes, labels, strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    node: DictConfig | dict[str, Any], run_dir: Path,
    on_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Validate, build every miner, compete (or resume), write summary.json and the plot."""
    resolved: dict[str, Any] = (
        node if isinstance(node, dict) else OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    )
    cc = from_dict(CompeteConfig, {k: v for k, v in resolved.items() if k != "hydra"})
    run_dir = Path(run_dir)
    mode = M.wandb_mode(cc.logger.mode)  # online: credentials checked before any work
    ckpt = run_dir / "competition.pt"
    resumed = cc.resume and ckpt.exists()
    state = checkpoint.load(ckpt) if resumed else None
    if state is not None:
        check_resumable(state, cc, run_dir)
    comp = Competition(cc, run_dir)
    if state is not None:
        comp.load_state_dict(state)
        log.info("resumed the competition at epoch %d", comp.epoch)
    loggers: list[M.Logger] = [
        M.JsonlLogger(run_dir / "metrics.jsonl", comp.epoch if resumed else None),
        M.ProgressLogger(cc.epochs, comp.epoch, cc.logger.progress),
    ]
    if mode != "disabled":
        cc.logger.mode = mode  # type: ignore[assignment]
        loggers.append(M.WandbLogger(run_dir, cc.logger, resolved))
    logger = M.MultiLogger(loggers)
    try:
        comp.run(logger, on_epoch)
    finally:
        logger.close()
    summary = comp.summary()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(comp.rows, run_dir / "competition.png")
    table = [{"miner": n, **{k: v for k, v in m.items() if k != "copier"}}
             for n, m in summary["miners"].items()]  # fmt: skip
    cols = ["miner", "final_loss", "reward", "mean_reward", "flags"]
    log.info("competition (%s)\n%s", run_dir, M.format_table(table, cols))
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="compete", version_base="1.3")
def _hydra_main(node: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out = one_line(lambda: run(node, run_dir), {ConfigError: 2, DataError: 2})
    return float(out["best_loss"])


def main() -> None:
    """Console entry point."""
    run_cli(_hydra_main, "compete")


if __name__ == "__main__":
    main()
