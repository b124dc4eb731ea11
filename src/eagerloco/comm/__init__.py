"""Communication: the outer process group's collectives, real (torch.distributed) or simulated (in-process)."""

from eagerloco.comm.base import (
    CollectiveAborted,
    CollectiveTimeout,
    CommStats,
    Communicator,
    CompletedWork,
    Work,
    wire_bytes,
)
from eagerloco.comm.inprocess import InProcessCommunicator, InProcessGroup, run_workers
from eagerloco.comm.link import EmulatedLink
from eagerloco.comm.reducer import CompletedMean, MeanReducer, PendingMean, Reducer
from eagerloco.comm.torch_dist import TorchDistributedCommunicator

__all__ = [
    "CollectiveAborted",
    "CollectiveTimeout",
    "CommStats",
    "Communicator",
    "CompletedMean",
    "CompletedWork",
    "EmulatedLink",
    "InProcessCommunicator",
    "InProcessGroup",
    "MeanReducer",
    "PendingMean",
    "Reducer",
    "TorchDistributedCommunicator",
    "Work",
    "run_workers",
    "wire_bytes",
]
