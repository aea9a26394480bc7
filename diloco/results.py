"""Load finished runs for notebooks and print sweep comparisons.

For notebooks (needs the dev extra: pandas, matplotlib)::

    metrics, summaries = load_runs("multirun/my_sweep")   # or a run dir, or a list of them
    plot_runs(metrics, x="comm/bytes_sent")               # eval loss against bytes, one line a run

``load_summaries(dir)`` reads every ``summary.json`` under a run or sweep folder into a list of
dicts; ``load_metrics(run_dir)`` reads ``metrics.jsonl``; both need only the standard library.
:class:`PrintSummaries` is a Hydra callback that prints one table of all jobs at the end of a
``-m`` sweep.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from diloco import metrics as M
from diloco.metrics import SUMMARY_COLUMNS, format_table

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DEV_EXTRA_HINT = "pip install -e '.[dev]'"

AXIS_LABELS = {
    M.TOKENS: "tokens per worker",
    M.BYTES_SENT: "bytes sent per worker",
    M.BYTES_RECV: "bytes received per worker",
    M.SIM_S: "modelled time (s)",
    M.COMM_S: "modelled communication time (s)",
    M.WALL_S: "wall time (s)",
    M.ROUND: "outer rounds",
    "step": "inner steps per worker",
    "comm_bytes_per_worker": "bytes sent per worker",
    "final_eval_loss": "final eval loss (nats/token)",
    M.EVAL_LOSS: "eval loss (nats/token)",
    M.EVAL_BPB: "eval bits per token",
    M.TRAIN_LOSS: "train loss (nats/token)",
}
"""Human-readable axis labels for metric columns; other columns are labelled by their name."""


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
    """Save a two-panel PNG of :func:`plot_runs`: eval loss against tokens and bytes sent.

    ``runs`` maps a label to a run dir (for runs that are not one sweep).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    metrics = pd.concat(
        pd.DataFrame(load_metrics(run_dir)).assign(run=label) for label, run_dir in runs.items()
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x in zip(axes, (M.TOKENS, M.BYTES_SENT), strict=True):
        plot_runs(metrics, x=x, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _natural_key(path: Path) -> list[Any]:
    """Sort key that puts Hydra job ``10_...`` after ``9_...``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _run_dirs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run folders (those holding a ``summary.json``) under ``paths``, each once, in order."""
    roots = [paths] if isinstance(paths, str | Path) else list(paths)
    found: dict[Path, None] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"no such run or sweep folder: {root}")
        dirs = sorted((p.parent for p in root.rglob("summary.json")), key=_natural_key)
        if not dirs:
            raise FileNotFoundError(f"no summary.json under {root} (has the run finished?)")
        found.update((d.resolve(), None) for d in dirs)
    return list(found)


def _overrides(run_dir: Path) -> list[str] | None:
    """The job's task overrides as in Hydra's ``override_dirname`` (sorted, excluded keys out).

    ``None`` when the run has no ``.hydra/overrides.yaml`` (not launched through Hydra).
    """
    hydra_dir = run_dir / ".hydra"
    if not (hydra_dir / "overrides.yaml").is_file():
        return None
    items = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]
    excluded: set[str] = set()
    if (hydra_dir / "hydra.yaml").is_file():
        keys = OmegaConf.select(
            OmegaConf.load(hydra_dir / "hydra.yaml"),
            "hydra.job.config.override_dirname.exclude_keys",
            default=[],
        )
        excluded = {str(k) for k in keys or []}
    return sorted(o for o in items if o.split("=", 1)[0].lstrip("+~") not in excluded)


def _labels(run_dirs: list[Path]) -> list[str]:
    """Short, unique run labels: the overrides that differ between runs, else the folder name.

    A single run is labelled by its whole override dirname (``algorithm=ddp,model=mlp``); in a
    sweep the overrides shared by every run are left out, so ``algorithm=ddp``.
    """
    overrides = [_overrides(d) for d in run_dirs]
    given = [set(o) for o in overrides if o]
    shared = set.intersection(*given) if len(given) > 1 else set()
    labels = []
    for run_dir, items in zip(run_dirs, overrides, strict=True):
        varying = [o for o in items or [] if o not in shared]
        labels.append(",".join(varying or items or []) or run_dir.name)
    for i, label in enumerate(labels):  # the same job in two sweeps: name the sweep
        if labels.count(label) > 1:
            labels[i] = f"{label} [{run_dirs[i].parent.name}]"
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = str(run_dirs[i])
    return labels


def load_runs(
    paths: str | Path | Iterable[str | Path], with_metrics: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load the metrics and summaries of finished runs into two DataFrames.

    Args:
        paths: A run folder, a sweep folder (every folder below it holding a ``summary.json``
            is a run) or a list of those. Runs are ordered by path, Hydra job number first.
        with_metrics: Read every ``metrics.jsonl``; False leaves the metrics frame empty.

    Returns:
        ``(metrics, summaries)``. ``metrics`` has one row per line of each run's
        ``metrics.jsonl`` (``step``, ``tokens``, ``eval/loss``, ``comm/bytes_sent``,
        ``time/sim_s``, ...; metrics not logged at a step are NaN) plus ``run`` and the
        summary's ``algorithm``. ``summaries`` has one row per run: ``run`` and every field of
        its ``summary.json``, with ``run_dir`` set to where the run was found. ``run`` is a
        short label: the Hydra overrides that differ between the loaded runs (such as
        ``algorithm=ddp``), or the folder name for runs without ``.hydra/overrides.yaml``.

    Raises:
        ImportError: pandas is not installed.
        FileNotFoundError: A path is missing or holds no ``summary.json``.
    """
    try:
        import pandas as pd
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"diloco.results.load_runs needs pandas, part of the dev extra: {DEV_EXTRA_HINT}"
        ) from err

    run_dirs = _run_dirs(paths)
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for run_dir, label in zip(run_dirs, _labels(run_dirs), strict=True):
        summary = json.loads((run_dir / "summary.json").read_text())
        summaries.append({"run": label, **summary, "run_dir": str(run_dir)})
        head = {"run": label, "algorithm": summary.get("algorithm")}
        if with_metrics and (run_dir / "metrics.jsonl").is_file():
            rows += [{**head, **row} for row in load_metrics(run_dir)]
    metrics = pd.DataFrame(rows, columns=None if rows else ["run", "algorithm", "step"])
    return metrics, pd.DataFrame(summaries)


def plot_runs(
    metrics: pd.DataFrame,
    x: str = M.TOKENS,
    y: str = M.EVAL_LOSS,
    ax: Axes | None = None,
    logx: bool | None = None,
) -> Axes:
    """Plot ``y`` against ``x``, one line per run, from the metrics frame of :func:`load_runs`.

    Args:
        metrics: One row per logged step with a ``run`` column, as :func:`load_runs` returns.
        x: The x column: ``"tokens"`` (per worker), ``"comm/bytes_sent"`` (cumulative per
            worker), ``"time/sim_s"`` (modelled time) or any other metric column.
        y: The y column; rows where ``x`` or ``y`` is missing (steps without an eval) are
            skipped.
        ax: Axes to draw on; a new figure when ``None``.
        logx: Log-scale x; by default on for byte counts only. Points at ``x <= 0`` (nothing
            sent yet) are left out on a log scale.

    Returns:
        The axes, with labelled axes and a legend naming the runs.

    Raises:
        KeyError: ``metrics`` has no ``x``, ``y`` or ``run`` column.
    """
    import matplotlib.pyplot as plt

    missing = [c for c in ("run", x, y) if c not in metrics.columns]
    if missing:
        raise KeyError(f"metrics has no column {missing}; columns: {list(metrics.columns)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    if logx is None:
        logx = x.startswith("comm/bytes")
    for run, group in metrics.groupby("run", sort=False):
        points = group[[x, y]].dropna()
        if logx:
            points = points[points[x] > 0]
        if not points.empty:
            ax.plot(points[x], points[y], marker="o", markersize=3, label=str(run))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(AXIS_LABELS.get(x, x))
    ax.set_ylabel(AXIS_LABELS.get(y, y))
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize="small")
    return ax


def _run_folders(runs: Any) -> list[Path]:
    """Run folders from a path, a list of paths or runs (``.dir``), or a frame's ``run_dir``."""
    if hasattr(runs, "columns"):
        return [Path(d) for d in runs["run_dir"]]
    if isinstance(runs, str | Path) or hasattr(runs, "dir"):
        runs = [runs]
    return [Path(getattr(r, "dir", r)) for r in runs]


def plot_curves(
    runs: Any,
    xs: Sequence[str] = (M.TOKENS, M.BYTES_SENT, M.SIM_S),
    y: str = M.EVAL_LOSS,
    path: str | Path | None = None,
) -> Figure:
    """One panel per x-axis (tokens, bytes sent, modelled time), ``y`` against each, a line per run.

    Args:
        runs: A run or sweep folder, a list of folders or :class:`diloco.api.Run`, or a frame
            with a ``run_dir`` column (what :func:`diloco.api.sweep` returns).
        xs: The x columns, one panel each.
        y: The y column (eval loss by default).
        path: Save the figure there too (PNG at 120 dpi).
    """
    import matplotlib.pyplot as plt

    metrics, _ = load_runs(_run_folders(runs))
    fig, axes = plt.subplots(1, len(xs), figsize=(5 * len(xs), 4), sharey=True, squeeze=False)
    for i, (ax, x) in enumerate(zip(axes[0], xs, strict=True)):
        plot_runs(metrics, x=x, y=y, ax=ax)
        if i:
            ax.set_ylabel("")
            if ax.get_legend() is not None:
                ax.get_legend().remove()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(
    summaries: Any,
    x: str = "comm_bytes_per_worker",
    y: str = "final_eval_loss",
    by: str = "run",
    ax: Axes | None = None,
) -> Axes:
    """Final loss against bytes sent per worker, a point per run, the Pareto front drawn.

    Args:
        summaries: A frame with ``x`` and ``y`` columns (:func:`diloco.api.sweep`,
            :func:`load_runs`), or what :func:`plot_curves` accepts.
        x: The x column, on a log axis (runs that sent nothing are left out).
        y: The y column.
        by: The column that labels and colours each point (``run``, ``algorithm``...).
        ax: Axes to draw on; a new figure when ``None``.
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = summaries if isinstance(summaries, pd.DataFrame) else load_runs(
        _run_folders(summaries))[1]  # fmt: skip
    missing = [c for c in (x, y, by) if c not in frame.columns]
    if missing:
        raise KeyError(f"summaries has no column {missing}; columns: {list(frame.columns)}")
    frame = frame[frame[x] > 0]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for label, group in frame.groupby(by, sort=False):
        ax.scatter(group[x], group[y], label=str(label), s=30)
    pts = list(zip(frame[x].astype(float), frame[y].astype(float), strict=True))
    front = [pts[i] for i in pareto_front(pts)]
    if front:
        ax.step(*zip(*front, strict=True), where="post", color="grey", lw=1, alpha=0.7,
                label="Pareto front")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(AXIS_LABELS.get(x, x.replace("_", " ")))
    ax.set_ylabel(AXIS_LABELS.get(y, y.replace("_", " ")))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax
