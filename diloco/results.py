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
