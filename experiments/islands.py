"""Memory per rank of each island engine on the default GPT, and its match with simulation.

    python experiments/islands.py            # 2 islands x 2 gloo ranks, 5 engines, ~3 min

Runs ``torchrun --nproc_per_node 4 -m diloco.train comm=torchdist workers.count=2
workers.ranks_per_worker=2 island=<engine>`` for ddp, fsdp, zero1, zero2 and zero3 on the
default GPT and corpus (``train.steps`` short), then the same 2-worker config simulated in one
process. Writes ``experiments/results/islands.md``: the bytes of training state each rank holds
between steps (weights, fp32 masters, optimizer state; gradients are transient), the outer
bytes sent per rank and the final eval loss against the simulated run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENGINES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
COMMON = ["workers.count=2", "algorithm.inner_steps=4", "train.eval_every=1000",
          "train.eval_sequences=16", "logger.mode=disabled", "logger.progress=false"]  # fmt: skip


def train(run_dir: Path, nproc: int, *overrides: str) -> dict:
    """One run; its ``summary.json``."""
    cmd = [sys.executable, "-m", "diloco.train"]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), "-m", "diloco.train", "comm=torchdist"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*cmd, *COMMON, *overrides, f"hydra.run.dir={run_dir}"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    """Run every engine and the simulation; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="inner steps per worker")
    parser.add_argument("--out", default="experiments/results/islands.md")
    args = parser.parse_args()
    steps = f"train.steps={args.steps}"
    with tempfile.TemporaryDirectory() as tmp:
        sim = train(Path(tmp) / "sim", 0, steps)
        rows = []
        for engine in ENGINES:
            print(f"island={engine} ...", flush=True)
            s = train(
                Path(tmp) / engine, 4, steps, "workers.ranks_per_worker=2", f"island={engine}"
            )
            rows.append((engine, s))
    ref = rows[0][1]["island_state_bytes_per_rank"]
    lines = [
        f"2 islands x 2 gloo ranks on CPU, default GPT ({sim['params']:,} parameters), AdamW,",
        f"{args.steps} inner steps per worker. Command: `python experiments/islands.py`.",
        "",
        "| engine | state per rank (MB) | vs ddp | outer bytes per rank | final eval loss "
        "| simulated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for engine, s in rows:
        held = s["island_state_bytes_per_rank"]
        lines.append(
            f"| {engine} | {held / 1e6:.2f} | {held / ref:.2f} | {s['comm_bytes_per_rank']:,.0f} "
            f"| {s['final_eval_loss']:.6f} | {sim['final_eval_loss']:.6f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
