"""Run the claims suite: tune, train every arm over the seeds, write the report.

    python experiments/claims/run.py                          # every claim, CPU scale
    python experiments/claims/run.py --claims ddp_gap,demo    # some of them
    python experiments/claims/run.py --scale gpu --jobs 1     # the larger suite on a GPU
    python experiments/claims/run.py --scale debug --results /tmp/claims   # CI's check
    python experiments/claims/run.py --report-only            # re-render from the records

For each claim in order: every grid point of its tuned arms (seed ``TUNE_SEED``), then the
chosen point of every arm with each seed. A finished run is appended to
``<results>/claims_runs.jsonl`` (final loss, bytes, eval curve) and never runs again, so the
suite resumes where it stopped; an interrupted run resumes from its checkpoint in
``runs/claims/<key>``. Runs are keyed by their resolved config. ``--jobs`` runs that many
trainings at once in subprocesses, each with ``workers.threads`` cores (default: cores /
jobs); ``--jobs 1`` trains in this process.
The report (``<results>/claims.md``, plots in ``<results>/claims/``) and the README's
results table are rendered from the records (experiments/claims/report.py).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from claims import BY_NAME, CLAIMS, SCALES, SEEDS, SIZES, TUNE_SEED, Arm, Claim  # noqa: E402
from report import render  # noqa: E402

UNHASHED = ("logger", "checkpoint", "resume", "experiment")
"""Top-level keys that do not change what a run computes."""


@dataclass
class Job:
    """One training: its overrides, the key of its resolved config, where it runs."""

    key: str
    regime: str
    overrides: list[str]
    seed: int
    ckpt_every: int
    cfg: Any = None  # the composed config (trained in process)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class Suite:
    """Expands claims into jobs, runs the missing ones, and keeps the records."""

    def __init__(
        self, scale: str, results: Path, run_root: Path, threads: int, in_process: bool = False
    ) -> None:
        self.scale, self.threads, self.run_root = scale, threads, run_root
        self.in_process = in_process
        # the debug scale checks the pipeline, not the claims: two seeds, two grid points
        self.seeds = SEEDS[:2] if scale == "debug" else SEEDS
        self.max_points = 2 if scale == "debug" else None
        self.records_path = results / "claims_runs.jsonl"
        self.records: dict[str, dict[str, Any]] = {}
        self._jobs: dict[tuple[str, tuple[str, ...], int], Job] = {}
        if self.records_path.exists():
            for line in self.records_path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec

    def arm_overrides(self, claim: Claim, arm: Arm, point: dict[str, Any], seed: int) -> list[str]:
        """Every override of one run of ``arm`` at grid ``point``, in order."""
        chosen = dict(point)
        if arm.outer_lr_factor != 1.0:
            key = "algorithm.outer_optimizer.lr"
            chosen[key] = chosen[key] * arm.outer_lr_factor
        return [
            *SIZES[self.scale][arm.size],
            *arm.overrides,
            *(f"{k}={_fmt(v)}" for k, v in chosen.items()),
            f"seed={seed}",
            *SCALES[self.scale],
        ]

    def job(self, claim: Claim, overrides: list[str], seed: int) -> Job:
        """Compose the run's config to key it by what it computes (once per distinct run)."""
        memo = (claim.regime, tuple(overrides), seed)
        if memo not in self._jobs:
            self._jobs[memo] = self._compose_job(claim, overrides, seed)
        return self._jobs[memo]

    def _compose_job(self, claim: Claim, overrides: list[str], seed: int) -> Job:
        from omegaconf import OmegaConf

        from diloco.compose import compose

        cfg = compose([f"experiment=claims/{claim.regime}", *overrides])

        node = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(node, dict)
        for k in UNHASHED:
            node.pop(k, None)
        key = hashlib.sha1(json.dumps(node, sort_keys=True, default=str).encode()).hexdigest()
        alg = node["algorithm"]
        per_round = max(1, alg.get("inner_steps", 1) // alg.get("fragments", 1))
        rounds = math.ceil(node["train"]["steps"] / per_round)
        return Job(key[:16], claim.regime, overrides, seed, max(1, rounds // 5), cfg)

    def loss(self, job: Job) -> float:
        """The job's final eval loss, NaN until it ran."""
        rec = self.records.get(job.key)
        return float(rec["final_eval_loss"]) if rec else math.nan

    def tuning_jobs(self, claim: Claim, arm: Arm) -> list[tuple[dict[str, Any], Job]]:
        """``(grid point, job)`` for every point of ``arm``'s grid."""
        if not arm.grid:
            return []
        grid = arm.grid
        points = [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())]
        points = points[: self.max_points]
        return [
            (p, self.job(claim, self.arm_overrides(claim, arm, p, TUNE_SEED), TUNE_SEED))
            for p in points
        ]

    def chosen(self, claim: Claim, arm: Arm) -> dict[str, Any] | None:
        """The tuned point of ``arm`` (lowest tuning loss), or None until all points ran."""
        src = claim.tuned_by(arm)
        if src is not arm:
            return self.chosen(claim, src)
        if not arm.grid:
            return {}
        jobs = self.tuning_jobs(claim, arm)
        if any(j.key not in self.records for _, j in jobs):
            return None
        scored = [(self.loss(j), p) for p, j in jobs]
        finite = [(loss, p) for loss, p in scored if math.isfinite(loss)]
        return min(finite, key=lambda t: t[0])[1] if finite else scored[0][1]

    def seed_jobs(self, claim: Claim, arm: Arm) -> list[Job]:
        """The arm's runs at its chosen point, one per seed (none until it is tuned)."""
        point = self.chosen(claim, arm)
        if point is None:
            return []
        return [self.job(claim, self.arm_overrides(claim, arm, point, s), s) for s in self.seeds]

    def run_all(self, jobs: Iterable[Job], n_jobs: int) -> None:
        """Run the jobs that have no record yet, ``n_jobs`` at a time."""
        todo = list({j.key: j for j in jobs if j.key not in self.records}.values())
        if not todo:
            return
        start = time.time()

        def one(i_job: tuple[int, Job]) -> None:
            i, job = i_job
            t0 = time.time()
            rec = self.train(job)
            done = f"{rec['final_eval_loss']:.4f}" if rec else "FAILED"
            print(
                f"  [{i + 1}/{len(todo)}] {job.regime} {' '.join(job.overrides[:8])} -> {done} "
                f"({time.time() - t0:.0f} s, {time.time() - start:.0f} s so far)",
                flush=True,
            )

        with ThreadPoolExecutor(n_jobs) as pool:
            list(pool.map(one, enumerate(todo)))

    def train(self, job: Job) -> dict[str, Any] | None:
        """One training (resumable): in this process, or in a subprocess when ``n_jobs`` > 1.

        Returns its record, or None if it failed (the error is printed; the suite goes on).
        """
        run_dir = self.run_root / job.key
        run_dir.mkdir(parents=True, exist_ok=True)
        extra = [
            "resume=true",
            f"checkpoint.every={job.ckpt_every}",
            f"workers.threads={self.threads}",
        ]
        if self.in_process:
            error = self._train_here(job, run_dir, extra)
        else:
            cmd = [
                sys.executable, "-m", "diloco.train", f"experiment=claims/{job.regime}",
                *job.overrides, *extra, f"hydra.run.dir={run_dir}",
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "WANDB_MODE": "disabled"}
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            (run_dir / "stdout.log").write_text(out.stdout + out.stderr)
            lines = (out.stderr or out.stdout).strip().splitlines()
            error = (lines[-1] if lines else "failed") if out.returncode else ""
        summary_path = run_dir / "summary.json"
        if error or not summary_path.exists():
            print(f"  FAILED {job.key} ({' '.join(job.overrides)}): {error}", flush=True)
            return None
        summary = json.loads(summary_path.read_text())
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
        curve = [[r["tokens"], r["eval/loss"]] for r in rows if "eval/loss" in r]
        rec = {
            "key": job.key, "regime": job.regime, "overrides": job.overrides, "seed": job.seed,
            "final_eval_loss": summary["final_eval_loss"],
            "comm_bytes_per_worker": summary["comm_bytes_per_worker"],
            "rounds": summary["rounds"], "params": summary["params"],
            "tokens_per_worker": summary["tokens_per_worker"],
            "wall_time_s": summary["wall_time_s"], "git_sha": summary.get("git_sha"),
            "curve": curve,
        }  # fmt: skip
        self.records[job.key] = rec
        with self.records_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        return rec

    def _train_here(self, job: Job, run_dir: Path, extra: list[str]) -> str:
        """Train ``job`` in this process (no interpreter start per run); the error, or ''."""
        from omegaconf import OmegaConf

        from diloco.config import ConfigError
        from diloco.data import DataError
        from diloco.train import run

        overrides = [f"experiment=claims/{job.regime}", *job.overrides, *extra]
        cfg = OmegaConf.merge(job.cfg, OmegaConf.from_dotlist(extra))
        try:
            run(cfg, run_dir, overrides)
        except (ConfigError, DataError) as err:
            return str(err)
        return ""

    def run_claim(self, claim: Claim, n_jobs: int) -> None:
        """Tune the claim's arms, then run every arm with each seed."""
        print(f"claim {claim.name}: tuning", flush=True)
        self.run_all((j for a in claim.arms for _, j in self.tuning_jobs(claim, a)), n_jobs)
        print(f"claim {claim.name}: {len(self.seeds)} seeds per arm", flush=True)
        self.run_all((j for a in claim.arms for j in self.seed_jobs(claim, a)), n_jobs)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the chosen claims, render the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", default="", help="comma-separated names (default: all)")
    parser.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per training")
    parser.add_argument("--results", default=str(ROOT / "experiments" / "results"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "claims"), help="run dirs")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="'' to skip")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in args.claims.split(",") if n] or [c.name for c in CLAIMS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"--claims: unknown {', '.join(unknown)}; allowed: {', '.join(BY_NAME)}")
    if args.jobs < 1:
        parser.error("--jobs: must be >= 1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.scale, results, Path(args.runs) / args.scale, threads, args.jobs == 1)
    if not args.report_only:
        for name in names:
            suite.run_claim(BY_NAME[name], args.jobs)
    render(suite, CLAIMS, results, Path(args.readme) if args.readme else None)


if __name__ == "__main__":
    main()
