"""Reading runs back for notebooks: summaries, curves, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diloco.metrics import JsonlLogger
from diloco.results import eval_curve, load_runs, load_summaries, plot_eval, plot_runs
from diloco.trainer import Trainer
from tests.helpers import TINY, make_config, synthetic_corpus


def test_curves_summaries_and_plot(tmp_path):
    cfg = make_config(*TINY, "workers.count=2", "algorithm.inner_steps=5", "train.steps=20",
                      "train.eval_every=10")  # fmt: skip
    run_dir = tmp_path / "run"
    trainer = Trainer.from_config(cfg, run_dir, synthetic_corpus())
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    summary = trainer.fit(logger)
    logger.close()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    tokens, losses = eval_curve(run_dir)
    assert tokens == [10 * 4 * 16, 20 * 4 * 16] and losses[-1] == summary["final_eval_loss"]
    assert load_summaries(tmp_path) == [summary]
    plot_eval({"diloco": run_dir}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def _fake_run(run_dir, algorithm, overrides, bytes_per_round, rounds=3, hydra=True):
    """A finished run as the CLI leaves it, written by hand: metrics, summary, Hydra overrides."""
    run_dir.mkdir(parents=True)
    rows = []
    for r in range(1, rounds + 1):
        common = {"step": 10 * r, "round": r, "tokens": 640 * r, "time/sim_s": 0.5 * r}
        rows.append({**common, "train/loss": 5.0 - r, "comm/bytes_sent": bytes_per_round * r})
        rows.append({**common, "eval/loss": 5.5 - r, "comm/bytes_sent": bytes_per_round * r})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {
        "algorithm": algorithm,
        "workers": 2,
        "inner_steps": 1 if algorithm == "ddp" else 10,
        "final_eval_loss": rows[-1]["eval/loss"],
        "comm_bytes_per_worker": rows[-1]["comm/bytes_sent"],
        "sim_time_s": rows[-1]["time/sim_s"],
        "run_dir": "/somewhere/else",
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if hydra:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def _fake_sweep(sweep):
    shared = ["model=mlp", "train.steps=30"]
    for num, (algorithm, sent) in enumerate([("ddp", 1000.0), ("diloco", 100.0), ("fedavg", 0.0)]):
        overrides = [f"algorithm={algorithm}", *shared]
        _fake_run(sweep / f"{num}_{','.join(sorted(overrides))}", algorithm, overrides, sent)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")


def test_load_runs_sweep_run_and_list(tmp_path):
    pd = pytest.importorskip("pandas")
    _fake_sweep(tmp_path / "sweep")
    _fake_run(tmp_path / "plain", "diloco", [], 10.0, rounds=2, hydra=False)

    metrics, summaries = load_runs(tmp_path / "sweep")
    assert isinstance(metrics, pd.DataFrame) and isinstance(summaries, pd.DataFrame)
    labels = ["algorithm=ddp", "algorithm=diloco", "algorithm=fedavg"]
    assert summaries["run"].tolist() == labels  # shared overrides left out of the label
    assert summaries["algorithm"].tolist() == ["ddp", "diloco", "fedavg"]
    assert summaries["final_eval_loss"].tolist() == [2.5, 2.5, 2.5]
    assert all(Path(d).parent == (tmp_path / "sweep").resolve() for d in summaries["run_dir"])
    assert len(metrics) == 3 * 6 and list(metrics["run"].unique()) == labels
    ddp = metrics[metrics["run"] == "algorithm=ddp"]
    assert set(ddp["algorithm"]) == {"ddp"}
    for col in ("step", "tokens", "eval/loss", "train/loss", "comm/bytes_sent", "time/sim_s"):
        assert col in metrics.columns
    assert ddp["eval/loss"].notna().sum() == 3 and ddp["eval/loss"].min() == 2.5

    metrics, summaries = load_runs([tmp_path / "sweep", tmp_path / "plain"])
    assert summaries["run"].tolist() == [*labels, "plain"]  # no .hydra: the folder name
    assert len(metrics) == 3 * 6 + 4

    only = next((tmp_path / "sweep").glob("0_*"))
    _, summaries = load_runs(str(only))  # one run: its whole override dirname
    assert summaries["run"].tolist() == ["algorithm=ddp,model=mlp,train.steps=30"]

    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        load_runs(tmp_path / "unfinished")
    with pytest.raises(FileNotFoundError, match="no such"):
        load_runs(tmp_path / "missing")


def test_plot_runs_one_line_per_run(tmp_path):
    pytest.importorskip("pandas")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    _fake_sweep(tmp_path / "sweep")
    metrics, _ = load_runs(tmp_path / "sweep")

    ax = plot_runs(metrics)
    assert isinstance(ax, Axes) and len(ax.get_lines()) == 3
    assert ax.get_xlabel() == "tokens per worker" and ax.get_xscale() == "linear"
    assert [line.get_label() for line in ax.get_lines()] == list(metrics["run"].unique())
    assert list(ax.get_lines()[0].get_ydata()) == [4.5, 3.5, 2.5]  # eval rows only

    fig, axes = plt.subplots(1, 2)
    ax = plot_runs(metrics, x="comm/bytes_sent", ax=axes[0])
    assert ax is axes[0] and ax.get_xscale() == "log"
    assert ax.get_xlabel() == "bytes sent per worker"
    assert len(ax.get_lines()) == 2  # fedavg sent 0 bytes: nothing to draw on a log axis
    ax = plot_runs(metrics, x="time/sim_s", ax=axes[1], logx=False)
    assert ax.get_xlabel() == "modelled time (s)" and len(ax.get_lines()) == 3
    assert "eval loss" in ax.get_ylabel()
    with pytest.raises(KeyError, match="no_such"):
        plot_runs(metrics, x="no_such")
    plt.close("all")
