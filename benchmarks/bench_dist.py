"""Overhead of the torch.distributed path versus in-process simulation; prints one JSON line.

Runs the same config (the default experiment unless overrides are given) three ways and reads
each run's ``summary.json``:

* ``inprocess``: ``python -m diloco.train`` (all K workers in one process);
* ``torchdist{n}``: ``torchrun --standalone --nproc_per_node n -m diloco.train
  comm=torchdist`` for each ``n`` of ``--nprocs`` (K/n workers per rank, gloo);

and reports each run's training-loop time (``wall_time_s``: after start-up, before exit), the
whole command's time, the final eval loss (equal up to fp32 summation order), and
``ratio_<name>``: training-loop time over the in-process run's. Every process gets
``--threads`` / n threads so all runs use the same cores.

Usage::

    python benchmarks/bench_dist.py --nprocs 2 4                 # default experiment
    python benchmarks/bench_dist.py --nprocs 2 -- train.steps=100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str], run_dir: Path, threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    out = subprocess.run(
        [*cmd, f"hydra.run.dir={run_dir}", "logger.progress=false"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "train_loop_s": round(summary["wall_time_s"], 2),
        "command_s": round(total, 2),
        "final_eval_loss": summary["final_eval_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("overrides", nargs="*", help="training overrides (after --)")
    args = parser.parse_args()
    train = [sys.executable, "-m", "diloco.train", *args.overrides]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["inprocess"] = run(train, Path(tmp) / "inprocess", args.threads)
        for n in args.nprocs:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            torchrun += ["--nproc_per_node", str(n), "-m", "diloco.train", "comm=torchdist"]
            threads = max(1, args.threads // n)
            results[f"torchdist{n}"] = run(
                [*torchrun, *args.overrides], Path(tmp) / f"dist{n}", threads
            )
    base = results["inprocess"]["train_loop_s"]
    report: dict[str, object] = {"overrides": args.overrides, "threads": args.threads, **results}
    for name, r in results.items():
        if name != "inprocess":
            report[f"ratio_{name}"] = round(r["train_loop_s"] / base, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
