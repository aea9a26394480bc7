"""Slurm launch paths on a local two-node cluster (the ``slurm_cluster`` fixture).

- a plain two-node job (srun on both nodes);
- slurm/train.sbatch's rendezvous: torchrun on both nodes, a gloo all-reduce in between;
- slurm/train.sbatch training with ``comm=torchdist`` across the two nodes, and a
  requeued job resuming from its checkpoint and ending equal to an uninterrupted job;
- ``-m hydra/launcher=slurm``: a sweep submitted as a job array (submitit).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import OFFLINE, REPO, free_port

pytestmark = pytest.mark.slurm

# Inherited by the jobs (sbatch --export=ALL): offline, one thread, gloo on loopback.
JOB_ENV = {
    **OFFLINE,
    "OMP_NUM_THREADS": "1",
    "GLOO_SOCKET_IFNAME": "lo",
    "PYTHON": sys.executable,
    "MAX_RESTARTS": "0",
}
# Seconds-long training, as tests/test_cli.py runs it.
TINY_TRAIN = (
    "model=mlp",
    "data.seq_len=16",
    "train.steps=20",
    "train.batch_size=4",
    "train.eval_every=10",
    "train.eval_sequences=8",
    "train.warmup_steps=2",
    "train.log_every=5",
    "algorithm.inner_steps=5",
    "logger.mode=disabled",
    "logger.progress=false",
)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} not written)"


def _submit_template(cluster, tmp_path: Path, *overrides: str, **env: str) -> tuple[str, Path]:
    """sbatch slurm/train.sbatch from the repo root, as a user would; returns (state, log)."""
    log = tmp_path / "job.out"
    job = cluster.sbatch(
        REPO / "slurm" / "train.sbatch",
        *overrides,
        options=["--time=5", f"--output={log}"],
        env={**JOB_ENV, "RDZV_PORT": str(free_port()), **env},
        cwd=REPO,
    )
    return cluster.wait(job, timeout=300), log


def test_two_node_job_runs_a_task_per_node(slurm_cluster, tmp_path):
    script = tmp_path / "nodes.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo $SLURM_NODEID $SLURMD_NODENAME'\n")
    log = tmp_path / "nodes.out"
    job = slurm_cluster.sbatch(
        script, options=["--nodes=2", "--ntasks-per-node=1", "--time=1", f"--output={log}"]
    )
    state = slurm_cluster.wait(job, timeout=60)
    assert state == "COMPLETED", _read(log) + slurm_cluster.log_tail()
    assert sorted(_read(log).split("\n")[:-1]) == ["0 n1", "1 n2"]


def test_train_sbatch_rendezvous_all_reduce(slurm_cluster, tmp_path):
    """The template's torchrun line, with a gloo all-reduce standing in for the trainer.

    2 nodes x 2 processes from a site file named by SITE_ENV. RDZV_HOST is left unset: the
    template looks up the first node's NodeAddr (127.0.0.1).
    """
    run_dir, site = tmp_path / "run", tmp_path / "site.env"
    site.write_text(f"PYTHON={sys.executable}\nNPROC_PER_NODE=2\n")
    state, log = _submit_template(
        slurm_cluster,
        tmp_path,
        "seed=3",
        SITE_ENV=str(site),
        RUN_DIR=str(run_dir),
        TRAIN_MODULE="tests.slurm_allreduce",
    )
    assert state == "COMPLETED", _read(log) + slurm_cluster.log_tail()
    assert "rendezvous 127.0.0.1:" in _read(log) and "2 x 2 processes" in _read(log)
    records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("allreduce-*.json"))]
    assert [r["rank"] for r in records] == [0, 1, 2, 3], _read(log)
    for r in records:
        assert r["world_size"] == 4 and r["sum"] == 1 + 2 + 3 + 4
        assert r["argv"] == [
            "comm=torchdist",
            "resume=true",
            f"hydra.run.dir={run_dir}",
            "seed=3",
        ]
    assert sorted(r["env"]["GROUP_RANK"] for r in records) == ["0", "0", "1", "1"]
    assert sorted(r["env"]["SLURM_NODEID"] for r in records) == ["0", "0", "1", "1"]


def _simulated(run_dir: Path) -> dict:
    """The 2-worker ``TINY_TRAIN`` run in one process: its ``summary.json``."""
    out = subprocess.run(
        [sys.executable, "-m", "diloco.train", *TINY_TRAIN, "workers.count=2",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, env={**os.environ, **JOB_ENV}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_train_sbatch_trains_across_two_nodes(slurm_cluster, tmp_path):
    """slurm/train.sbatch end to end: 2 nodes x 1 process, comm=torchdist."""
    run_dir = tmp_path / "run"
    state, log = _submit_template(
        slurm_cluster,
        tmp_path,
        *TINY_TRAIN,
        "workers.count=2",
        RDZV_HOST="127.0.0.1",
        NPROC_PER_NODE="1",
        RUN_DIR=str(run_dir),
    )
    assert state == "COMPLETED", _read(log)[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert math.isfinite(summary["final_eval_loss"]), summary
    assert summary["workers"] == 2
    # the same config simulated in one process gives the same model
    expected = _simulated(tmp_path / "sim")["final_eval_loss"]
    assert summary["final_eval_loss"] == pytest.approx(expected, abs=1e-6)


def test_train_sbatch_requeued_job_resumes_in_its_run_dir(slurm_cluster, tmp_path):
    """A job requeued mid-run (node failure, preemption) restarts with the same job id and
    run dir and resumes from the checkpoint (resume=true), appending to its log."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    overrides = [o for o in TINY_TRAIN if not o.startswith("train.steps=")]
    job = slurm_cluster.sbatch(
        REPO / "slurm" / "train.sbatch",
        *overrides,
        "train.steps=1500",
        "checkpoint.every=2",
        "workers.count=2",
        options=["--time=5", f"--output={log}"],
        env={**JOB_ENV, "RDZV_HOST": "127.0.0.1", "RDZV_PORT": str(free_port()),
             "RUN_DIR": str(run_dir)},
        cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("checkpoint*.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(run_dir.glob("checkpoint*.pt")), _read(log)[-5000:]
    slurm_cluster.run("scontrol", "requeue", job)
    state = slurm_cluster.wait(job, timeout=300)
    text = _read(log)
    assert state == "COMPLETED", text[-5000:]
    assert f"job {job} (restart 0)" in text and f"job {job} (restart 1)" in text
    assert "resumed from" in text.split("(restart 1)")[1], text[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1500 and math.isfinite(summary["final_eval_loss"]), summary


def test_hydra_slurm_launcher_submits_a_job_array(slurm_cluster, tmp_path):
    """``-m hydra/launcher=slurm seed=0,1``: two jobs of an array, each a full run."""
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diloco.train",
            "-m",
            "hydra/launcher=slurm",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
            "hydra.launcher.timeout_min=5",
            "hydra.launcher.cpus_per_task=1",
            *TINY_TRAIN,
        ],
        cwd=REPO,
        env={**slurm_cluster.env, **JOB_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = "\n".join(_read(p) for p in sorted(sweep.glob(".submitit/*/*.out")))
    assert out.returncode == 0, out.stderr[-5000:] + logs[-5000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 2, logs[-5000:]
    assert all(math.isfinite(s["final_eval_loss"]) for s in summaries)
    tasks = sorted(p.name for p in sweep.glob(".submitit/[0-9]*_[0-9]*"))  # <array>_<task>
    assert len(tasks) == 2 and tasks[0].split("_")[0] == tasks[1].split("_")[0], tasks


def _metric_rows(run_dir: Path) -> list[dict]:
    """``metrics.jsonl`` without the measured wall time (modelled time is set, so it stays)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time/wall_s"} for x in lines]


def _last_step(run_dir: Path) -> int:
    """The step of the last whole row of a run's ``metrics.jsonl`` (0: none yet)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except ValueError:  # a line being written
            continue
    return 0


def test_train_sbatch_requeued_job_ends_equal_to_an_uninterrupted_job(slurm_cluster, tmp_path):
    """A job requeued mid-run ends bitwise equal to the same job run through: every metrics
    row (the steps the restart ran, and those kept from before), the final eval loss, bytes,
    modelled time and the global model. Both are slurm/train.sbatch jobs (2 nodes x 1
    process, ``OMP_NUM_THREADS=1``), one after the other."""
    steps = 1500
    overrides = [o for o in TINY_TRAIN if not o.startswith("train.steps=")]
    overrides += [f"train.steps={steps}", "checkpoint.every=1", "workers.count=2",
                  "workers.step_time_s=0.01"]  # fmt: skip

    def submit(name: str) -> tuple[str, Path, Path]:
        run_dir, log = tmp_path / name, tmp_path / f"{name}.out"
        job = slurm_cluster.sbatch(
            REPO / "slurm" / "train.sbatch",
            *overrides,
            options=["--time=5", f"--output={log}"],
            env={**JOB_ENV, "RDZV_HOST": "127.0.0.1", "RDZV_PORT": str(free_port()),
                 "RUN_DIR": str(run_dir)},
            cwd=REPO,
        )  # fmt: skip
        return job, run_dir, log

    job, full, log = submit("full")
    assert slurm_cluster.wait(job, timeout=300) == "COMPLETED", _read(log)[-5000:]

    job, requeued, log = submit("requeued")
    deadline = time.monotonic() + 120
    while _last_step(requeued) < steps // 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    # (not a glob for checkpoints: while both ranks save, each file is briefly only .prev)
    assert _last_step(requeued) >= steps // 5, _read(log)[-5000:]
    slurm_cluster.run("scontrol", "requeue", job)  # a fifth of the way in, or more
    state = slurm_cluster.wait(job, timeout=300)
    text = _read(log)
    assert state == "COMPLETED", text[-5000:]
    assert f"job {job} (restart 1)" in text, text[-5000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", text.split("(restart 1)")[1])
    assert resumed, text[-5000:]
    at = int(resumed[1])
    assert steps // 10 <= at < steps, at  # from the checkpoint of the last round it saved

    rows, expected = _metric_rows(requeued), _metric_rows(full)
    assert [r for r in rows if r["step"] > at], "nothing ran after the restart"
    assert rows == expected
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((requeued / "summary.json").read_text())
    assert a["steps"] == b["steps"] == steps
    for key in ("final_eval_loss", "comm_bytes_total", "sim_time_s", "tokens_per_worker"):
        assert a[key] == b[key], key
    for rank in (0, 1):
        want, got = (
            torch.load(d / f"checkpoint-rank{rank}.pt", map_location="cpu", weights_only=False)
            for d in (full, requeued)
        )
        assert want["step"] == got["step"] == steps
        assert torch.equal(want["group"]["global"], got["group"]["global"])
        assert torch.equal(want["group"]["params"], got["group"]["params"])


def test_train_sbatch_runs_one_island_per_node(slurm_cluster, tmp_path):
    """2 nodes x 2 processes, an FSDP island per node: the simulated 2-worker run's model."""
    run_dir, sim = tmp_path / "run", tmp_path / "sim"
    island = ("workers.count=2", "workers.ranks_per_worker=2", "island=fsdp")
    state, log = _submit_template(
        slurm_cluster,
        tmp_path,
        *TINY_TRAIN,
        *island,
        RDZV_HOST="127.0.0.1",
        NPROC_PER_NODE="2",
        RUN_DIR=str(run_dir),
    )
    assert state == "COMPLETED", _read(log)[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ranks_per_worker"] == 2 and summary["workers"] == 2
    expected = _simulated(sim)
    assert summary["final_eval_loss"] == pytest.approx(expected["final_eval_loss"], abs=1e-5)
    assert summary["comm_bytes_per_rank"] == expected["comm_bytes_per_worker"] / 2
