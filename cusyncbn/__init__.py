"""cusyncbn: framework-agnostic cross-GPU synchronized batch normalization.

``SyncBatchNorm`` follows ``paddle.nn.SyncBatchNorm`` (API and maths) with explicit
``forward`` / ``backward``; NumPy + MPI on the CPU, CuPy kernels + NCCL on the GPU.
Importing this package imports neither mpi4py, CuPy nor any framework.
"""
from ._abort import set_abort_on_failure
from ._checkpoint import export_state_dict, load_checkpoint, load_state_dict, save_checkpoint
from ._comm import Communicator, MPIComm, SingleProcessComm
from ._device import get_device, set_device
from ._dlpack import device_of
from ._grads import allreduce_gradients
from ._grad_mode import no_grad
from ._layer import BatchNorm1D, BatchNorm2D, BatchNorm3D, SyncBatchNorm
from ._params import ParamAttr, Parameter
from ._watchdog import set_collective_timeout
from . import functional

__version__ = "0.1.0"


def __getattr__(name: str):
    # NCCLComm pulls in CuPy: resolved on first use only.
    if name == "NCCLComm":
        from ._nccl import NCCLComm
        return NCCLComm
    raise AttributeError(f"module 'cusyncbn' has no attribute {name!r}")


__all__ = [
    "BatchNorm1D", "BatchNorm2D", "BatchNorm3D", "Communicator", "MPIComm", "NCCLComm",
    "ParamAttr", "Parameter", "SingleProcessComm", "SyncBatchNorm", "allreduce_gradients",
    "device_of", "export_state_dict", "functional", "get_device", "load_checkpoint", "load_state_dict", "no_grad",
    "save_checkpoint", "set_abort_on_failure", "set_collective_timeout", "set_device", "__version__",
]
