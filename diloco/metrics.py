"""Loggers: W&B, ``metrics.jsonl``, and a console progress bar; metric names in one place.

A logger has two methods, ``log(metrics, step)`` and ``close()``; :class:`MultiLogger` fans out
to several. Only rank 0 builds loggers. ``step`` is the number of inner steps each worker has
taken; ``round``, ``tokens`` (per worker) and ``time/wall_s`` are extra x-axes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import netrc
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

if importlib.util.find_spec("ipywidgets") is not None:  # a widget bar in notebooks
    from tqdm.auto import tqdm
else:  # tqdm.auto would warn in a notebook without ipywidgets; a text bar works everywhere
    from tqdm import tqdm

from diloco.config import ConfigError

log = logging.getLogger(__name__)

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
EVAL_LOSS = "eval/loss"
EVAL_BPB = "eval/bits_per_token"
BYTES_SENT = "comm/bytes_sent"
BYTES_RECV = "comm/bytes_recv"
WALL_S = "time/wall_s"
SIM_S = "time/sim_s"
COMM_S = "time/comm_s"
EXCLUDED = "adversary/excluded"
ROUND = "round"
TOKENS = "tokens"


class Logger(Protocol):
    """Receives metrics; ``step`` is inner steps per worker."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record ``metrics`` at ``step``."""
        ...

    def close(self) -> None:
        """Flush and release resources."""
        ...


class MultiLogger:
    """Fan-out to several loggers."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Forward to every logger."""
        for lg in self.loggers:
            lg.log(metrics, step)

    def close(self) -> None:
        """Close every logger."""
        for lg in self.loggers:
            lg.close()


class JsonlLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    On resume from step ``s`` the lines after ``s`` (written after the checkpoint by the run
    that died) are dropped so the file matches an uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self._file = path.open("a")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Write one line ``{"step": step, **metrics}``."""
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


# WANDB_MODE values W&B accepts, as the mode passed to ``wandb.init``
_WANDB_ENV_MODES = {"online": "online", "run": "online", "shared": "online",
                    "offline": "offline", "dryrun": "offline", "disabled": "disabled"}  # fmt: skip


def wandb_mode(mode: str | None) -> str:
    """The W&B mode: ``logger.mode``, or when it is null ``$WANDB_MODE``, else ``offline``.

    ``online`` without credentials is a one-line error naming where it came from, before any
    work (W&B would print a long traceback once training starts).
    """
    key = f"logger.mode={mode}"
    if mode is None:
        env = os.environ.get("WANDB_MODE", "").strip()
        if env and env not in _WANDB_ENV_MODES:
            raise ConfigError(f"WANDB_MODE={env}", f"allowed: {', '.join(_WANDB_ENV_MODES)}")
        mode, key = _WANDB_ENV_MODES.get(env, "offline"), f"WANDB_MODE={env}"
    if mode == "online" and not has_wandb_credentials():
        raise ConfigError(
            key,
            "no W&B credentials (WANDB_API_KEY or ~/.netrc); run `wandb login`, or use "
            "logger.mode=offline and `wandb sync` the run later",
        )
    return mode


def has_wandb_credentials() -> bool:
    """An API key in the environment or in the netrc file for W&B's host (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    # W&B keys its netrc entry by the server's netloc (host and port, for a local server)
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for path in paths:
        try:
            if netrc.netrc(os.path.expanduser(path)).authenticators(host) is not None:
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


class WandbLogger:
    """Weights & Biases run (offline by default), resumable by its id in the run dir."""

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any]) -> None:
        import wandb  # lazy: heavy import

        if not os.environ.get("WANDB_MODE", "x").strip():
            del os.environ["WANDB_MODE"]  # W&B refuses an empty one; empty means unset here

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            name=cfg.name,
            tags=list(cfg.tags),
            mode=cfg.mode,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow",
        )
        for axis in (ROUND, TOKENS, WALL_S, SIM_S):
            self.run.define_metric(axis)
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log with ``step`` as an explicit metric (works across resumes)."""
        self.run.log({"step": step, **metrics})

    def close(self) -> None:
        """Finish the run."""
        self.run.finish()


class ProgressLogger:
    """A tqdm bar over inner steps showing the latest train and eval loss."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step")
        self.step = initial
        self.shown: dict[str, str] = {}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Advance to ``step`` and show losses."""
        for key, short in ((TRAIN_LOSS, "loss"), (EVAL_LOSS, "eval")):
            if key in metrics:
                self.shown[short] = f"{metrics[key]:.4f}"
        self.bar.set_postfix(self.shown, refresh=False)
        self.bar.update(step - self.step)
        self.step = step

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given ``columns``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float) and math.isfinite(v):
            if v.is_integer() or abs(v) >= 1e3:
                return f"{v:,.0f}"
            return f"{v:.4f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


SUMMARY_COLUMNS = [
    "algorithm",
    "workers",
    "inner_steps",
    "tokens_per_worker",
    "final_eval_loss",
    "comm_bytes_per_worker",
    "wall_time_s",
    "sim_time_s",
]
