"""Entry point: ``python -m diloco.train [overrides]`` (also the ``diloco-train`` script).

Compose the config with Hydra, validate it, build the trainer, fit, write ``summary.json``.
A bad config value or missing data exits with status 2 and one line naming what is wrong.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from diloco import metrics as M
from diloco.build import build_comm, build_parts
from diloco.comm.base import Communicator
from diloco.comm.torchdist import CommError
from diloco.compose import CONF_DIR, one_line, run_cli
from diloco.config import Config, ConfigError, parse
from diloco.data import DataError, load_corpus
from diloco.trainer import Trainer

log = logging.getLogger("diloco")


def git_sha() -> str:
    """The source tree's commit, or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=CONF_DIR.parent, capture_output=True, text=True
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def loggers(
    trainer: Trainer, resolved: dict[str, Any], overrides: list[str], resumed: bool
) -> M.MultiLogger:
    """The run's loggers: metrics.jsonl, the progress bar and W&B, on the main process."""
    cfg = trainer.cfg
    run_dir = trainer.run_dir
    if not trainer.is_main:  # rank 0 logs for the whole run
        return M.MultiLogger([])
    out: list[M.Logger] = [
        M.JsonlLogger(run_dir / "metrics.jsonl", trainer.step if resumed else None),
        M.ProgressLogger(cfg.train.steps, trainer.step, cfg.logger.progress),
    ]
    if cfg.logger.mode != "disabled":
        run_config = {**resolved, "git_sha": git_sha(), "overrides": overrides}
        out.append(M.WandbLogger(run_dir, cfg.logger, run_config))
    return M.MultiLogger(out)


Start = Callable[[Communicator, torch.device, Path], tuple[Trainer, bool]]
"""``start(comm, device, run_dir)``: the trainer, and whether it continues an earlier run."""


PEER_TRANSPORTS = {"BucketComm": "bucket", "HivemindComm": "hivemind"}
"""Communicators of one peer per process, started by :mod:`diloco.peer`."""


def execute(
    resolved: dict[str, Any], cfg: Config, run_dir: Path, overrides: list[str], start: Start,
    **comm_args: Any,
) -> dict[str, Any]:  # fmt: skip
    """Build the transport, ``start`` the trainer, fit with the run's loggers, write the summary.

    ``comm_args`` go to the communicator (a bucket peer's id). The main process writes
    ``summary.json``; the transport is left whatever happens.
    """
    mode = M.wandb_mode(cfg.logger.mode)  # online: credentials checked here
    cfg.logger.mode = resolved["logger"]["mode"] = mode  # type: ignore[assignment]
    comm, device = build_comm(cfg, **comm_args)
    try:
        run_dir = comm.shared_path(run_dir)
        trainer, resumed = start(comm, device, run_dir)
        logger = loggers(trainer, resolved, overrides, resumed)
        try:
            summary = trainer.fit(logger)
        finally:
            logger.close()
    finally:
        comm.close()
    summary.update(git_sha=git_sha(), run_dir=str(run_dir))
    if trainer.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("summary (%s)\n%s", run_dir, M.format_table([summary], M.SUMMARY_COLUMNS))
    return summary


def run(node: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Validate ``node``, build the run's parts, train, and write ``summary.json``.

    With ``comm=torchdist`` every rank calls this; building the communicator joins the
    process group, every rank uses rank 0's ``run_dir``, and rank 0 alone logs and writes
    the summary.
    """
    resolved: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    cfg = parse(resolved)
    target = str(cfg.comm.get("_target_", "")).rsplit(".", 1)[-1]
    if target in PEER_TRANSPORTS:
        raise ConfigError(
            f"comm={PEER_TRANSPORTS[target]}",
            "one peer per process: python -m diloco.peer (K on this machine: diloco.swarm)",
        )

    def start(comm: Communicator, device: torch.device, run_dir: Path) -> tuple[Trainer, bool]:
        trainer = Trainer(build_parts(cfg, comm, device, load_corpus(cfg.data)), run_dir)
        return trainer, cfg.resume and trainer.maybe_resume()

    return execute(resolved, cfg, run_dir, list(overrides or []), start)


def sweep_group(sweep_dir: str) -> str:
    """The W&B group the runs of one ``-m`` sweep share, unless ``logger.group`` is set.

    ``multirun/2026-11-26/13-40-00`` -> ``sweep-2026-11-26_13-40-00``.
    """
    return "sweep-" + "_".join(Path(sweep_dir).parts[-2:])


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(node: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN and node.logger.group is None:
        node.logger.group = sweep_group(hydra_cfg.sweep.dir)
    errors = {ConfigError: 2, DataError: 2, CommError: 1}
    out = one_line(lambda: run(node, run_dir, list(hydra_cfg.overrides.task)), errors)
    return float(out["final_eval_loss"])


def main() -> None:
    """Console entry point."""
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
