"""The command line as a user runs it: one-line errors, experiments, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import OFFLINE, REPO, text_run

ENV = {**os.environ, **OFFLINE}
QUIET = ("logger.mode=disabled", "logger.progress=false")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240):
    return subprocess.run(
        [sys.executable, "-m", "diloco.train", *args],
        cwd=REPO,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def small_run(corpus_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    sizes = ("data.seq_len=32", "model.n_embd=32", "train.batch_size=4", "train.eval_every=40")
    return text_run(corpus_dir, run_dir, *sizes, *extra)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("algorithm.inner_steps=0", "algorithm.inner_steps=0: must be >= 1"),
        ("workers.count=-2", "workers.count=-2: must be >= 1"),
        ("algorithm=foo", "algorithm=foo: unknown; allowed: ddp, demo, diloco, fedavg"),
        ("train.steps=abc", "train.steps: got 'abc'; expected an integer"),
        ("optimizer.lr=-1", "optimizer.lr=-1: Invalid learning rate: -1"),
        ("data.path=/no/such/corpus", "/no/such/corpus"),
        ("device=tpu9", "device=tpu9: not a torch device"),
        ("optimizer.lr=abc", "optimizer.lr: got 'abc'; expected a number"),
        ("+optimizer.betaz=1", "optimizer.betaz: unknown argument; known: lr, betas"),
        ("model.n_layer=2.5", "model.n_layer: got 2.5; expected an integer"),
        ("algoritm=ddp", "algoritm=ddp: unknown key; did you mean algorithm?"),
        ("train.stepz=10", "train.stepz=10: unknown key; did you mean train.steps?"),
        ("trian.steps=10", "trian.steps=10: unknown key; did you mean train.steps?"),
        ("WANDB_MODE=bogus", "WANDB_MODE=bogus: allowed: online, run, shared, offline"),
        ("validator=null", "validator=null: a group takes an option; ~validator drops it"),
        ("logger.name=a=b", "logger.name=a=b: mismatched input '='"),
    ],
)
def test_bad_config_exits_with_one_line(override, expected, tmp_path):
    if override.startswith("WANDB_MODE="):  # the environment, with logger.mode left null
        out = cli(f"hydra.run.dir={tmp_path}", env={**ENV, "WANDB_MODE": override[11:]})
    else:
        out = cli(override, f"hydra.run.dir={tmp_path}", *QUIET)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in out.stdout + out.stderr


def test_plugin_arguments_are_checked_before_the_corpus_loads(tmp_path):
    out = cli("optimizer.lr=abc", "data.path=/no/such/corpus", f"hydra.run.dir={tmp_path}", *QUIET)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: optimizer.lr: got 'abc'")


def test_a_seq_len_the_corpus_cannot_fill_fails_in_seconds(tmp_path):
    start = time.monotonic()
    out = cli("data.seq_len=1000000", f"hydra.run.dir={tmp_path}", *QUIET, timeout=60)
    elapsed = time.monotonic() - start
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: data.seq_len=1000000, train.batch_size=8: the corpus packs")
    assert "workers.count=4 x train.batch_size=8 need 32" in lines[0]
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_online_logging_without_credentials_is_one_line(tmp_path):
    env = {k: v for k, v in ENV.items() if not k.startswith(("WANDB", "NETRC"))}
    env["HOME"] = str(tmp_path)  # no ~/.netrc
    out = cli("logger.mode=online", "data.path=/no/such/corpus", f"hydra.run.dir={tmp_path}",
              env=env, timeout=60)  # fmt: skip
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "logger.mode=online: no W&B credentials" in lines[0] and "wandb login" in lines[0]


@pytest.mark.parametrize(
    ("env_mode", "offline_run"), [("offline", True), ("disabled", False), ("", True)]
)  # empty: unset, so offline (W&B itself refuses an empty WANDB_MODE)
def test_wandb_mode_from_the_environment_when_the_config_sets_none(env_mode, offline_run, tmp_path):
    env = {**ENV, "WANDB_MODE": env_mode}
    out = cli("experiment=debug", "logger.mode=null", f"hydra.run.dir={tmp_path}", env=env)
    assert out.returncode == 0, out.stderr
    assert any((tmp_path / "wandb").glob("offline-run-*")) == offline_run


def test_a_plain_sweep_prints_one_table(tmp_path):
    out = cli("-m", "seed=0,1", "experiment=debug", f"hydra.sweep.dir={tmp_path}", *QUIET)
    assert out.returncode == 0, out.stderr
    table = out.stdout.split(f"sweep {tmp_path}")[-1]
    assert table.count("diloco") == 2 and "final_eval_loss" in table


def test_debug_experiment_writes_metrics_summary_and_wandb_offline(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}
    out = cli("experiment=debug", "logger.mode=offline", f"hydra.run.dir={tmp_path}", env=env)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "final_eval_loss",
        "comm_bytes_per_worker",
        "comm_bytes_total",
        "tokens_per_worker",
        "wall_time_s",
        "algorithm",
        "workers",
        "inner_steps",
    ):
        assert key in summary
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and "eval/loss" in rows[-1] and "comm/bytes_sent" in rows[-1]
    assert any((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert "final_eval_loss" in out.stdout  # the console summary table


@pytest.mark.parametrize(
    ("experiment", "algorithms"),
    [("diloco_vs_ddp", ["ddp", "diloco"]), ("demo_vs_ddp", ["ddp", "demo"])],
)
def test_comparison_experiments_print_both(experiment, algorithms, tmp_path):
    out = cli(
        f"experiment={experiment}",
        "model=mlp",
        "train.steps=10",
        "data.seq_len=32",
        f"hydra.sweep.dir={tmp_path}",
        *QUIET,
    )
    assert out.returncode == 0, out.stderr
    summaries = sorted(
        (json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")),
        key=lambda s: s["algorithm"],
    )
    assert [s["algorithm"] for s in summaries] == algorithms
    table = out.stdout.split("sweep")[-1]
    assert all(a in table for a in algorithms)


def test_comm_methods_experiment_runs_every_method(tmp_path):
    for experiment in ("comm_methods", "comm_methods_codecs"):  # one sweep dir for both
        out = cli(
            f"experiment={experiment}",
            "model.n_layer=1",
            "model.n_head=2",
            "model.n_embd=16",
            "train.steps=4",
            "data.seq_len=16",
            "train.eval_sequences=4",
            f"hydra.sweep.dir={tmp_path}",
            *QUIET,
        )
        assert out.returncode == 0, out.stderr
    summaries = [json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")]
    assert sorted(s["algorithm"] for s in summaries) == sorted(
        ["ddp", "diloco", "diloco", "diloco", "streaming_diloco", "sparseloco", "demo"]
    )
    assert all("sim_time_s@100mbps" in s for s in summaries)


def test_robustness_and_straggler_experiments_and_their_report(tmp_path):
    tiny = ("train.steps=4", "algorithm.inner_steps=2", "model.n_embd=16", "data.seq_len=16",
            "train.eval_sequences=4", "train.eval_every=2", *QUIET)  # fmt: skip
    rob, strag = tmp_path / "robustness", tmp_path / "stragglers"
    gauntlet = tmp_path / "robustness_gauntlet"
    out = cli("experiment=robustness", "attack=none,sign_flip", f"hydra.sweep.dir={rob}", *tiny)
    assert out.returncode == 0, out.stderr
    assert len(list(rob.rglob("summary.json"))) == 2 * 7  # every aggregator
    out = cli("experiment=robustness_gauntlet", "attack=none,sign_flip",
              f"hydra.sweep.dir={gauntlet}", *tiny)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(list(gauntlet.rglob("summary.json"))) == 2  # the validator as the defense
    out = cli("experiment=stragglers", f"hydra.sweep.dir={strag}", *tiny)
    assert out.returncode == 0, out.stderr
    detection = tmp_path / "validator_detection"
    out = cli("experiment=validator_detection", "attack=none,mimic",
              f"hydra.sweep.dir={detection}", *tiny)  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = subprocess.run(
        [sys.executable, "experiments/robustness.py", str(rob), str(gauntlet),
         "--stragglers", str(strag), "--detection", str(detection),
         "--out", str(tmp_path / "table.md")],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "table.md").read_text()
    assert "| sign_flip |" in table and "| longtail | deadline |" in table
    header = next(line for line in table.splitlines() if line.startswith("| attack | mean"))
    assert header.endswith("| nnm | gauntlet |")
    none_row = next(line for line in table.splitlines() if line.startswith("| none |"))
    assert "|  |" not in none_row  # every defense's honest run found, the validator's too
    assert table.count("| sign_flip |") == 2  # the loss table and the validator's detection
    mimic = next(line for line in table.splitlines() if line.startswith("| mimic | "))
    assert mimic.split(" | ")[3] == "1.00 / 1.00"  # the copy check catches the copier
    assert "flagged" in next(line for line in table.splitlines()[::-1] if "| none |" in line)


def test_every_experiment_config_is_tested():
    names = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    assert names == {"debug", "diloco_vs_ddp", "demo_vs_ddp", "comm_methods",
                     "comm_methods_codecs", "robustness", "robustness_gauntlet",
                     "stragglers", "validator_detection"}  # fmt: skip


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)


def test_sigkill_then_resume_equals_uninterrupted(corpus_dir, tmp_path):
    common = ("workers.count=2", "algorithm.inner_steps=4", "train.steps=240", "checkpoint.every=1")
    full, killed = tmp_path / "full", tmp_path / "killed"
    out = cli(*small_run(corpus_dir, full, *common))
    assert out.returncode == 0, out.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "diloco.train", *small_run(corpus_dir, killed, *common)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # two metrics lines (every 10 steps) mean a checkpoint (every 4) past the first line
        # exists: killing right after the first checkpoint (step 4) left nothing to compare
        metrics, deadline = killed / "metrics.jsonl", time.monotonic() + 120
        while time.monotonic() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 2
        ):
            time.sleep(0.02)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "summary.json").exists(), "run finished before it could be killed"
    saved = _final_state(killed)["step"]
    assert 0 < saved < 240
    # the killed run's lines up to the checkpoint, measured times included: a run that
    # restarted from scratch would rewrite them with other times
    before = [
        line
        for line in (killed / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= saved
    ]
    assert before

    out = cli(*small_run(corpus_dir, killed, *common, "resume=true"))
    assert out.returncode == 0, out.stderr
    assert f"at step {saved} (round {saved // 4})" in out.stdout + out.stderr
    after = (killed / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # kept, and only the steps after were run
    assert all(json.loads(line)["step"] > saved for line in after[len(before) :])
    a, b = _final_state(full), _final_state(killed)
    assert a["step"] == b["step"] == 240
    assert torch.equal(a["group"]["global"], b["group"]["global"])
    assert torch.equal(a["group"]["params"], b["group"]["params"])
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sa["final_eval_loss"] == sb["final_eval_loss"]
    assert sa["comm_bytes_total"] == sb["comm_bytes_total"]

    def rows(d: Path) -> list[dict]:
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [  # measured times differ between runs; everything else must not
            {k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines
        ]

    assert rows(full) == rows(killed)


def test_runs_of_a_sweep_share_a_wandb_group():
    from diloco.train import sweep_group

    assert sweep_group("multirun/2026-11-26/13-40-00") == "sweep-2026-11-26_13-40-00"
    assert sweep_group("/abs/multirun/2026-11-26/13-40-00") == sweep_group(
        "multirun/2026-11-26/13-40-00"
    )


def test_a_key_one_option_of_a_swept_group_lacks_is_one_line(tmp_path):
    out = cli(
        "-m", "algorithm=ddp,diloco", "algorithm.inner_steps=3", f"hydra.sweep.dir={tmp_path}"
    )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: algorithm.inner_steps=3: unknown key with algorithm=ddp")
    assert not list(tmp_path.rglob("summary.json"))


def test_a_glob_sweep_over_a_group_runs(tmp_path):
    out = cli("-m", "codec=glob(int*)", "experiment=debug", f"hydra.sweep.dir={tmp_path}", *QUIET)
    assert out.returncode == 0, out.stderr
    assert len(list(tmp_path.rglob("summary.json"))) == 2  # int4 and int8
