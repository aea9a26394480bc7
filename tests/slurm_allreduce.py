"""Stand-in for diloco.train under slurm/train.sbatch (TRAIN_MODULE=tests.slurm_allreduce).

Each torchrun worker joins a gloo process group, all-reduces ``rank + 1`` and writes what it
saw into ``<hydra.run.dir>/allreduce-<rank>.json``: proves the template's rendezvous and
argument passing without the trainer.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str]) -> None:
    run_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")))
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    dist.barrier()
    env = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "GROUP_RANK", "SLURM_NODEID", "SLURM_PROCID")
    record = {
        "rank": rank,
        "world_size": world,
        "sum": value.item(),
        "argv": argv,
        "env": {k: os.environ.get(k) for k in env},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"allreduce-{rank}.json").write_text(json.dumps(record, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
