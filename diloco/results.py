"""Load finished runs for notebooks and print sweep comparisons.

``load_summaries(dir)`` reads every ``summary.json`` under a run or sweep folder into a list of
dicts (a pandas DataFrame is one call away: ``pd.DataFrame(load_summaries(d))``);
``load_metrics(run_dir)`` reads ``metrics.jsonl``. :class:`PrintSummaries` is a Hydra callback
that prints one table of all jobs at the end of a ``-m`` sweep.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from diloco.metrics import SUMMARY_COLUMNS, format_table

log = logging.getLogger(__name__)


def load_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every ``summary.json`` under ``root``, sorted by path."""
    return [json.loads(p.read_text()) for p in sorted(Path(root).rglob("summary.json"))]


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl``."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class PrintSummaries(Callback):
    """At the end of a sweep, print one row per job from its ``summary.json``."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        """Print the comparison table of the sweep folder."""
        rows = load_summaries(config.hydra.sweep.dir)
        if rows:
            table = format_table(rows, SUMMARY_COLUMNS)
            log.info("sweep %s\n%s", config.hydra.sweep.dir, table)


def eval_curve(run_dir: str | Path, x: str = "tokens") -> tuple[list[float], list[float]]:
    """``(x values, eval losses)`` of a run, for rows where the eval loss was logged."""
    rows = [r for r in load_metrics(run_dir) if "eval/loss" in r]
    return [float(r[x]) for r in rows], [float(r["eval/loss"]) for r in rows]


def plot_eval(runs: dict[str, str | Path], path: str | Path, title: str = "") -> None:
    """Save a two-panel PNG: eval loss against tokens per worker and against bytes sent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        for ax, x in zip(axes, ("tokens", "comm/bytes_sent"), strict=True):
            xs, ys = eval_curve(run_dir, x)
            ax.plot(xs, ys, marker="o", label=label)
    axes[0].set_xlabel("tokens per worker")
    axes[1].set_xlabel("bytes sent per worker")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("eval loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
