"""Communication: move payload rows between workers and count every byte."""

from diloco.comm.base import Communicator, allgather_bytes, ring_allreduce_bytes
from diloco.comm.inprocess import InProcessComm

__all__ = ["Communicator", "InProcessComm", "allgather_bytes", "ring_allreduce_bytes"]
