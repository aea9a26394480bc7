"""Communication: move payload rows between workers and count every byte."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diloco.comm.base import Communicator, allgather_bytes, ring_allreduce_bytes
from diloco.comm.inprocess import InProcessComm

if TYPE_CHECKING:
    from diloco.config import Config

__all__ = ["Communicator", "InProcessComm", "allgather_bytes", "make_comm", "ring_allreduce_bytes"]


def make_comm(cfg: Config, device: torch.device) -> InProcessComm:
    """The run's communicator: all workers here, or torch.distributed ranks (torchrun's group)."""
    if cfg.comm.backend == "torchdist":
        from diloco.comm.torchdist import TorchDistComm, init_from_env

        init_from_env(device, cfg.comm.dist_backend, cfg.comm.timeout_s)
        return TorchDistComm(cfg.workers.count, cfg.comm.topology, cfg.comm.timeout_s)
    return InProcessComm(cfg.workers.count, cfg.comm.topology)
