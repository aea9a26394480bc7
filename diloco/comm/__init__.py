"""Communication: collectives and placement, with every byte and modelled second counted.

Communicators are built from ``conf/comm/`` by ``_target_``: :class:`InProcessComm` (all K
workers in this process), :class:`diloco.comm.torchdist.TorchDistComm` (K/N per rank) or
:class:`diloco.comm.bucket.BucketComm` (one peer per process, exchanging through an object
store, :mod:`diloco.peer`).
"""

from diloco.comm.base import Collective, CommConfig, Communicator
from diloco.comm.inprocess import InProcessComm
from diloco.comm.topology import TOPOLOGIES, allgather_bytes, ring_allreduce_bytes

__all__ = [
    "TOPOLOGIES",
    "Collective",
    "CommConfig",
    "Communicator",
    "InProcessComm",
    "allgather_bytes",
    "ring_allreduce_bytes",
]
