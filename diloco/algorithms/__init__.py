"""Synchronisation algorithms; each is built from ``conf/algorithm/*.yaml`` by ``_target_``."""

from diloco.algorithms.base import Algorithm, AlgorithmBase, Exchange, Gather, Payload, StepContext
from diloco.algorithms.ddp import DDP
from diloco.algorithms.diloco import DiLoCo

__all__ = [
    "DDP",
    "Algorithm",
    "AlgorithmBase",
    "DiLoCo",
    "Exchange",
    "Gather",
    "Payload",
    "StepContext",
]
