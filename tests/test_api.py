"""diloco.api end to end: train, a 2x2 sweep, reload, plot; overrides and errors as the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from diloco import api
from diloco.results import pareto_front

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

TINY = {"model": "mlp", "steps": 20, "seq_len": 32, "workers": 2, "train__eval_every": 10}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)  # default folders (outputs/api, multirun/api) land here


def test_train_sweep_load_and_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    run = api.train(algorithm="diloco", inner_steps=5, progress=False, **TINY)
    assert run.dir.is_relative_to("outputs/api") and (run.dir / "summary.json").is_file()
    assert run.summary["algorithm"] == "diloco" and run.summary["rounds"] == 4
    assert run.config["workers"]["count"] == 2 and run.config["algorithm"]["inner_steps"] == 5
    metrics = run.metrics
    assert metrics["step"].tolist() == [10, 20]  # one row per logged step, in order
    assert metrics["eval/loss"].notna().tolist() == [True, True]  # eval_every=10
    assert metrics["comm/bytes_sent"].is_monotonic_increasing
    assert math.isclose(metrics["eval/loss"].iloc[-1], run.final_eval_loss)
    assert metrics["comm/bytes_sent"].iloc[-1] == run.summary["comm_bytes_per_worker"]

    grid = {"algorithm": ["ddp", "diloco"], "optimizer.lr": [1e-3, 3e-5]}  # 3e-05: not YAML
    frame = api.sweep(grid, dir=tmp_path / "sw", progress=False, **TINY)
    assert len(frame) == 4
    assert frame[["algorithm", "optimizer.lr"]].values.tolist() == [
        ["ddp", 1e-3], ["ddp", 3e-5], ["diloco", 1e-3], ["diloco", 3e-5]
    ]  # fmt: skip
    assert frame["optimizer.lr"].dtype == float
    assert frame["final_eval_loss"].notna().all() and (frame["workers"] == 2).all()
    # DDP sends every step, DiLoCo once per 50 (capped at the run): fewer bytes
    ddp, diloco = frame.groupby("algorithm")["comm_bytes_per_worker"].first()
    assert diloco < ddp
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["grid"] == grid

    def stamps(f):
        return [(Path(d) / "summary.json").stat().st_mtime_ns for d in f.run_dir]

    before = stamps(frame)
    again = api.sweep(grid, dir=tmp_path / "sw", progress=False, **TINY)  # reuses every run
    assert stamps(again) == before
    pd.testing.assert_frame_equal(again, frame)
    reloaded = api.load(tmp_path / "sw")
    pd.testing.assert_frame_equal(reloaded, frame)
    one = api.load(frame.run_dir[2])
    assert isinstance(one, api.Run) and one.summary == json.loads(
        (one.dir / "summary.json").read_text()
    )

    fig = api.plot_curves(frame, path=tmp_path / "curves.png")
    assert len(fig.axes) == 3 and len(fig.axes[0].get_lines()) == 4
    ax = api.plot_pareto(frame, by="algorithm")
    ax.figure.savefig(tmp_path / "pareto.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_sweep_in_a_process_pool_equals_in_process(tmp_path):
    grid = {"seed": [0, 1]}
    pool = api.sweep(grid, dir=tmp_path / "pool", processes=2, progress=False, **TINY)
    here = api.sweep(grid, dir=tmp_path / "here", progress=False, workers__threads=1, **TINY)
    assert pool["final_eval_loss"].tolist() == pytest.approx(here["final_eval_loss"].tolist())
    assert pool["seed"].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"algoritm": "ddp"}, "algoritm=ddp: unknown key; did you mean algorithm?"),
        ({"train__stepz": 3}, "train.stepz=3: unknown key; did you mean train.steps?"),
        ({"lr": "abc"}, "optimizer.lr: got 'abc'; expected a number"),
        ({"lr": -1}, "optimizer.lr=-1: Invalid learning rate: -1"),
        ({"algorithm": "nope"}, "algorithm=nope: unknown; allowed: ddp, demo, diloco"),
    ],
)
def test_errors_raise_the_cli_one_line_message(kwargs, message, tmp_path):
    with pytest.raises(api.ConfigError) as err:
        api.train(progress=False, **kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "outputs").exists()  # nothing made before the checks


def test_a_bad_grid_fails_before_any_run(tmp_path):
    with pytest.raises(api.ConfigError, match="optimizer.lr=-1"):
        api.sweep({"optimizer.lr": [1e-3, -1]}, dir=tmp_path / "sw", progress=False, **TINY)
    assert not (tmp_path / "sw").exists()
    with pytest.raises(api.ConfigError, match="grid"):
        api.sweep({"seed": "01"}, progress=False)


def test_overrides_read_back_as_written():
    cfg = api.config(
        "seed=3",
        workers="straggler",  # a group option
        workers__speeds=[1.0, 0.5, 0.25, 0.125],
        logger__name="a name, with: odd 'chars' and a \\ backslash",
        logger__entity=None,
        resume=True,
        steps=7,
    )
    assert cfg["seed"] == 3 and cfg["train"]["steps"] == 7 and cfg["resume"] is True
    assert cfg["workers"]["profile"] == "straggler"
    assert cfg["workers"]["speeds"] == [1.0, 0.5, 0.25, 0.125]
    assert cfg["logger"]["name"] == "a name, with: odd 'chars' and a \\ backslash"
    assert cfg["logger"]["entity"] is None
    assert api.config(validator="gauntlet")["validator"] is not None
    assert api.config(validator=None).get("validator") is None  # None drops the group


def test_a_finished_run_dir_is_not_overwritten(tmp_path):
    run = api.train(dir=tmp_path / "r", progress=False, **TINY)
    with pytest.raises(api.ConfigError, match="holds a finished run"):
        api.train(dir=run.dir, progress=False, **TINY)


def test_pareto_front():
    points = [(1.0, 5.0), (2.0, 4.0), (2.0, 6.0), (3.0, 4.5), (4.0, 1.0), (0.5, 9.0)]
    assert pareto_front(points) == [5, 0, 1, 4]


def test_an_error_inside_a_pool_process_comes_back_as_the_same_one_line(tmp_path):
    with pytest.raises(api.ConfigError, match=r"data.seq_len=4000, train.batch_size=8: the corpus"):
        api.sweep({"seed": [0, 1]}, "data.seq_len=4000", "train.batch_size=8", dir=tmp_path / "s",
                  processes=2, progress=False, model="mlp", steps=2, workers=200)  # fmt: skip


def test_a_sweep_experiment_or_online_logging_without_credentials_is_refused_up_front(
    tmp_path, monkeypatch
):
    with pytest.raises(api.ConfigError, match="experiment=diloco_vs_ddp: is a sweep"):
        api.train("experiment=diloco_vs_ddp", progress=False)
    for key in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(api.ConfigError, match="logger.mode=online: no W&B credentials"):
        api.train(dir=tmp_path / "r", logger__mode="online", progress=False, **TINY)
    assert not (tmp_path / "r").exists()


def test_wandb_credentials_are_found_where_wandb_keeps_them(tmp_path, monkeypatch):
    from diloco.metrics import has_wandb_credentials

    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine localhost:8080\n  login user\n  password key\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert not has_wandb_credentials()  # api.wandb.ai has no entry
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")  # a local server: by netloc
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert has_wandb_credentials()
