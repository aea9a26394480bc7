"""Atomic checkpoints of the whole trainer state: a plain dict saved with ``torch.save``.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the previous one, so a run killed at any moment leaves either the old or the new
checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from diloco.config import ConfigError

FILENAME = "checkpoint.pt"


def path_for(run_dir: Path, rank: int, world_size: int) -> Path:
    """``checkpoint.pt`` for one process; ``checkpoint-rank<r>.pt`` per rank when distributed."""
    return run_dir / (FILENAME if world_size == 1 else f"checkpoint-rank{rank}.pt")


def ranks_written(run_dir: Path) -> set[int]:
    """Ranks with a checkpoint in ``run_dir`` (-1 for a single-process ``checkpoint.pt``)."""
    found = (re.fullmatch(r"checkpoint-rank(\d+)\.pt", p.name) for p in run_dir.iterdir())
    ranks = {int(m[1]) for m in found if m}
    return ranks | ({-1} if (run_dir / FILENAME).exists() else set())


def previous(path: Path) -> Path:
    """Where :func:`save` keeps the checkpoint it replaced (``keep_previous``)."""
    return path.with_name(path.name + ".prev")


def save(state: dict[str, Any], path: Path, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically (write, fsync, rename).

    With ``keep_previous`` the replaced checkpoint is kept as :func:`previous` (ranks that save
    separately can then fall back to a step that all of them reached).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, previous(path))
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` (tensors on CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


class Reducer(Protocol):
    """What :func:`load_agreed` needs from the communicator."""

    rank: int
    world_size: int

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks."""
        ...


def load_agreed(path: Path, comm: Reducer) -> dict[str, Any] | None:
    """This rank's checkpoint at the latest step every rank saved (None: start from scratch).

    Each rank has ``path`` and maybe its :func:`previous`. A rank killed between two ranks'
    saves leaves the ranks one checkpoint apart; they then all load the older step, and a
    rank that falls back drops its newer file so that its next save keeps the right
    previous one. Ranks that never all saved the same step start from scratch.
    """
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    for p in (previous(path), path):  # the newest file wins a tie
        if p.exists():
            state = load(p)
            found[state["step"]] = (p, state)
    if comm.world_size == 1:
        return found[max(found)][1] if found else None
    table = torch.zeros(comm.world_size, 2, dtype=torch.float64)  # step + 1; 0: none
    for j, step in enumerate(sorted(found, reverse=True)[:2]):
        table[comm.rank, j] = step + 1
    table = comm.all_reduce_sum(table)  # each rank filled its own row
    have = [{int(v) - 1 for v in row.tolist() if v > 0} for row in table]
    common = set.intersection(*have)
    if not common:
        return None
    file, state = found[max(common)]
    if file != path:  # fell back: the newer file is not part of the run any more
        os.replace(file, path)
    return state


def resume_state(
    run_dir: Path, path: Path, comm: Reducer, local_ids: list[int]
) -> dict[str, Any] | None:
    """:func:`load_agreed`, after checking that the checkpoints fit this run's placement.

    Checkpoints written by another number of processes, or holding other workers on a
    rank, are a one-line error on every rank (so that none waits for the others).
    """
    world = comm.world_size
    written = ranks_written(run_dir)  # the run dir is shared by all ranks
    if written and (max(written) >= world or (world > 1) == (-1 in written)):
        by = "one process" if written == {-1} else f"{max(written) + 1} ranks"
        raise ConfigError(
            "resume", f"{run_dir} holds checkpoints written by {by}; this run has {world}"
        )
    state = load_agreed(path, comm)
    moved = state is not None and state.get("local_ids", local_ids) != local_ids
    if comm.all_reduce_sum(torch.tensor([float(moved)])).item() > 0:
        raise ConfigError(
            "resume",
            f"the checkpoints place the workers differently from this run's {world} ranks: "
            "resume with the same workers.count and ranks",
        )
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
