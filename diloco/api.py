"""Train, sweep and reload runs from a notebook or a script, in this process.

The same config as the command line (Hydra's compose API over ``conf/``), the same checks and
one-line errors (a :class:`ConfigError` carries the message ``diloco.train`` prints)::

    from diloco import api

    run = api.train(algorithm="diloco", workers=8, steps=300)       # keyword shorthands
    run = api.train("algorithm=ddp", "optimizer.lr=1e-3")           # or Hydra overrides
    run.summary["final_eval_loss"], run.metrics, run.config, run.dir

    frame = api.sweep({"algorithm": ["ddp", "diloco"], "optimizer.lr": [1e-3, 3e-3]},
                      steps=300, processes=2)                        # one row per run
    api.load(frame.run_dir[0])                                       # a Run again
    api.load("multirun/2026-12-02/10-00-00")                         # a CLI sweep, as a frame
    api.plot_curves(frame)                                           # loss vs tokens/bytes/time
    api.plot_pareto(frame)                                           # bytes vs final loss

Keyword arguments: ``steps``, ``workers`` (a number; a string picks the worker profile),
``batch_size``, ``lr``, ``inner_steps``, ``outer_lr``, ``seq_len`` are shorthands (see
:data:`SHORTHANDS`); a config group takes its option (``algorithm="ddp"``); any other key is
a dotted path written with ``__`` (``optimizer__weight_decay=0.0``). Values are written as
Hydra would read them (``True`` -> ``true``, ``None`` -> ``null``, lists as ``[a,b]``).
"""

from __future__ import annotations

import datetime
import itertools
import json
import multiprocessing
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from diloco.compose import CONF_DIR, compose
from diloco.config import ConfigError, parse
from diloco.data import DataError
from diloco.metrics import wandb_mode
from diloco.results import load_metrics, load_runs, plot_curves, plot_pareto, plot_runs
from diloco.train import sweep_group

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ConfigError", "DataError", "Run", "config", "load", "overrides", "plot_curves",
    "plot_pareto", "plot_runs", "sweep", "train",
]  # fmt: skip

SHORTHANDS = {
    "steps": "train.steps",
    "workers": "workers.count",
    "batch_size": "train.batch_size",
    "lr": "optimizer.lr",
    "inner_steps": "algorithm.inner_steps",
    "outer_lr": "algorithm.outer_optimizer.lr",
    "seq_len": "data.seq_len",
}
"""Keyword shorthands of :func:`train` and :func:`sweep` and the keys they stand for."""

_PLAIN = re.compile(r"^[\w./:+-]+$")


def _value(value: Any) -> str:
    """``value`` as Hydra's override grammar reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.match(text):
        return text
    return "'" + text.replace("'", "\\'") + "'"  # Hydra unescapes only quotes


def _override(name: str, value: Any) -> str:
    """One keyword argument as an override: a group option, a shorthand or a dotted key."""
    if (CONF_DIR / name).is_dir() and (isinstance(value, str) or value is None):
        return f"~{name}" if value is None else f"{name}={value}"  # algorithm="ddp"
    return f"{SHORTHANDS.get(name, name.replace('__', '.'))}={_value(value)}"


def overrides(*args: str | Iterable[str], **kwargs: Any) -> list[str]:
    """Hydra overrides from strings (or lists of them) and keyword arguments, in order."""
    out: list[str] = []
    for arg in args:
        out.extend([arg] if isinstance(arg, str) else list(arg))
    out += [_override(k, v) for k, v in kwargs.items()]
    return out


def _prepare(argv: list[str]) -> DictConfig:
    """Compose one run (not a sweep experiment) and run every check that needs no data."""
    node = compose(argv, single_run=True)
    resolved: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    parse(resolved)
    wandb_mode(resolved["logger"]["mode"])
    return node


def config(*args: str | Iterable[str], **kwargs: Any) -> dict[str, Any]:
    """The resolved config a run with these overrides would use, validated (nothing trained)."""
    resolved = OmegaConf.to_container(_prepare(overrides(*args, **kwargs)), resolve=True)
    return resolved  # type: ignore[return-value]


@dataclass
class Run:
    """A finished run: its folder, ``summary.json``, resolved config and metrics."""

    dir: Path
    summary: dict[str, Any]
    config: dict[str, Any] = field(repr=False)
    overrides: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per logged inner step (``step``): train, eval, comm and time columns.

        Eval columns are NaN at the steps without an eval (every ``train.eval_every``
        steps and the last one have it); byte and time columns are cumulative per worker.
        """
        import pandas as pd

        frame = pd.DataFrame(load_metrics(self.dir))
        if frame.empty:
            return frame
        return frame.groupby("step", as_index=False, sort=True).last()

    @property
    def final_eval_loss(self) -> float:
        """The summary's final eval loss (nats per token)."""
        return float(self.summary["final_eval_loss"])

    def plot(self, x: str = "tokens", y: str = "eval/loss", ax: Any = None) -> Any:
        """``y`` against ``x`` for this run (see :func:`diloco.results.plot_runs`)."""
        return plot_runs(self.metrics.assign(run=self.dir.name), x=x, y=y, ax=ax)


def _new_dir(root: str) -> Path:
    now = datetime.datetime.now()
    base = Path(root) / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _save_hydra(run_dir: Path, node: DictConfig, args: list[str]) -> None:
    """Write ``.hydra/config.yaml`` and ``overrides.yaml`` as the CLI does (for :func:`load`)."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(node, hydra_dir / "config.yaml")
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(list(args)))


def _train(
    args: list[str],
    run_dir: Path,
    progress: bool,
    node: DictConfig | None = None,
    threads: int | None = None,
    group: str | None = None,
) -> dict[str, Any]:
    """Train ``args`` (composed already as ``node``, or here) into ``run_dir``."""
    from diloco.train import run

    node = _prepare(args) if node is None else node
    node.logger.progress = bool(progress and node.logger.progress)
    if threads is not None and node.workers.threads is None:
        node.workers.threads = threads  # a pool's share of the cores, unless set
    if group is not None and node.logger.group is None:
        node.logger.group = group  # the runs of a sweep share a W&B group, as with -m
    _save_hydra(run_dir, node, args)
    return run(node, run_dir, args)


def train(
    *args: str | Iterable[str], dir: str | Path | None = None, progress: bool = True, **kwargs: Any
) -> Run:
    """Train one run in this process and return it.

    Args:
        args: Hydra overrides (``"algorithm=ddp"``), or lists of them.
        dir: The run folder; default ``outputs/api/<date>/<time>`` under the working folder.
            A folder holding a finished run is refused (:func:`load` it instead).
        progress: Show a progress bar (a notebook widget where available).
        kwargs: Shorthands, group options and ``__``-dotted keys (see the module docstring).

    Raises:
        ConfigError: A bad key or value, with the CLI's one-line message, before training.
        DataError: The corpus cannot be read.
    """
    argv = overrides(*args, **kwargs)
    node = _prepare(argv)  # every check before any folder is made
    run_dir = Path(dir) if dir is not None else _new_dir("outputs/api")
    if (run_dir / "summary.json").is_file():
        raise ConfigError(f"dir={run_dir}", "holds a finished run; api.load() it or pick another")
    _train(argv, run_dir, progress, node)
    run = load(run_dir)
    assert isinstance(run, Run)
    return run


def _dirname(items: Sequence[str]) -> str:
    return ",".join(items).replace("/", "-") or "run"


def _job(payload: tuple[list[str], str, int, str]) -> str:
    """A process-pool job: one training with ``threads`` torch threads."""
    args, run_dir, threads, group = payload
    _train(args, Path(run_dir), False, threads=threads, group=group)
    return run_dir


def sweep(
    grid: Mapping[str, Sequence[Any]],
    *args: str | Iterable[str],
    dir: str | Path | None = None,
    processes: int = 1,
    progress: bool = True,
    **kwargs: Any,
) -> pd.DataFrame:
    """Train every combination of ``grid`` (on top of ``args`` and ``kwargs``).

    Args:
        grid: Key -> values, keys as in :func:`train`'s keyword arguments or dotted
            (``{"algorithm": ["ddp", "diloco"], "optimizer.lr": [1e-3, 3e-3]}``).
        args: Overrides shared by every run, as in :func:`train`.
        dir: The sweep folder; default ``multirun/api/<date>/<time>``. A run whose folder
            already holds a finished run with the same overrides is not trained again, so a
            re-executed notebook reuses its results.
        processes: Runs at once, each in its own process with ``cores / processes`` torch
            threads; 1 trains in this process. The processes are spawned, so a script (not
            a notebook) calling this needs the ``if __name__ == "__main__":`` guard. A pool
            gives the same losses as one process (bitwise, default GPT, 4 steps).
        progress: A progress bar over the runs (and, with one process, inside each run).
        kwargs: Shared shorthands, group options and ``__``-dotted keys.

    Returns:
        One row per run, as :func:`load` gives for the sweep folder: the grid keys as
        columns, then every ``summary.json`` field, ``run`` (a label) and ``run_dir``.

    Raises:
        ConfigError: A bad key or value in any run, before the first one trains.
    """
    from diloco.metrics import tqdm  # a widget in notebooks that have ipywidgets

    if processes < 1:
        raise ConfigError(f"processes={processes}", "must be >= 1")
    if not grid or any(isinstance(v, str) or not len(v) for v in grid.values()):
        raise ConfigError("grid", "expected a mapping of keys to non-empty lists of values")
    base = overrides(*args, **kwargs)
    combos = [
        [_override(k, v) for k, v in zip(grid, values, strict=True)]
        for values in itertools.product(*grid.values())
    ]
    nodes = [_prepare([*base, *items]) for items in combos]  # all checked before any trains
    sweep_dir = Path(dir) if dir is not None else _new_dir("multirun/api")
    group = sweep_group(str(sweep_dir))  # the W&B group a -m sweep's runs share
    todo: list[tuple[list[str], str, DictConfig]] = []
    for i, (items, node) in enumerate(zip(combos, nodes, strict=True)):
        run_dir = sweep_dir / f"{i}_{_dirname(items)}"
        saved = run_dir / ".hydra" / "overrides.yaml"
        finished = (run_dir / "summary.json").is_file() and saved.is_file()
        if not (finished and yaml.safe_load(saved.read_text()) == [*base, *items]):
            todo.append(([*base, *items], str(run_dir), node))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(
        json.dumps({"grid": {k: list(v) for k, v in grid.items()}, "overrides": base}, indent=2)
    )
    bar = tqdm(total=len(todo), disable=not progress or not todo, unit="run")
    if processes == 1:
        for argv, folder, node in todo:
            bar.set_description(_dirname(argv[len(base) :]))
            _train(argv, Path(folder), progress, node, group=group)
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // processes)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            for _ in pool.map(_job, [(a, d, threads, group) for a, d, _ in todo]):
                bar.update()
    bar.close()
    return load(sweep_dir)


def _parse_value(item: str) -> tuple[str, Any]:
    """``key=value`` as Hydra reads it (``1e-3`` a float, as YAML 1.1 does not)."""
    try:
        override = OverridesParser.create().parse_overrides([item])[0]
        return override.key_or_group, override.value()
    except Exception:  # an override Hydra would not parse alone: keep the text
        key, _, value = item.partition("=")
        return key.lstrip("+~"), value


def load(path: str | Path) -> Run | pd.DataFrame:
    """Reopen a finished run (a folder with ``summary.json``) or a sweep (a folder above runs).

    A run comes back as a :class:`Run`; a sweep (from :func:`sweep` or ``diloco.train -m``)
    as a DataFrame with one row per run: a column per override that differs between the
    runs (``algorithm``, ``optimizer.lr``, values parsed), the summary fields, ``run`` and
    ``run_dir``.

    Raises:
        FileNotFoundError: No run or sweep there (or its runs have not finished).
    """
    path = Path(path)
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
        hydra_dir = path / ".hydra"
        resolved: Any = {}
        args: list[str] = []
        if (hydra_dir / "config.yaml").is_file():
            resolved = OmegaConf.to_container(
                OmegaConf.load(hydra_dir / "config.yaml"), resolve=True
            )
        if (hydra_dir / "overrides.yaml").is_file():
            args = [
                str(a) for a in yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []
            ]
        return Run(path, summary, resolved, args)
    _, summaries = load_runs(path, with_metrics=False)
    runs = [load(d) for d in summaries.run_dir]
    sets = [set(r.overrides) for r in runs if isinstance(r, Run)]
    shared = set.intersection(*sets) if sets else set()
    columns: dict[str, list[Any]] = {}
    for i, r in enumerate(runs):
        assert isinstance(r, Run)
        for item in r.overrides:
            if item not in shared and "=" in item:
                key, value = _parse_value(item)
                columns.setdefault(key, [None] * len(runs))[i] = value
    for key in reversed(list(columns)):
        if key in summaries.columns:
            summaries = summaries.drop(columns=key)
        summaries.insert(0, key, columns[key])
    return summaries
