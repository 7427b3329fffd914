"""NCCL communicator, bootstrapped through mpi4py (CuPy's ``cupy.cuda.nccl``).

Rank 0 creates the NCCL unique id, MPI broadcasts it, every rank creates its
``NcclCommunicator`` on its device. All-reduces run on the current CuPy stream: no
host synchronization, and CUDA-graph capture works.
"""
from __future__ import annotations

import os
import socket
import warnings
from functools import partial
from typing import Any

from . import _abort, _watchdog
from ._comm import MPIComm, agree_on_length, peek_tag


class NCCLComm:
    """Sum all-reduce of CuPy buffers over NCCL.

    Args:
        mpi_comm: the mpi4py communicator whose processes form the group (default
            ``MPI.COMM_WORLD``; a ``Split`` gives group-wise sync).
        device: CUDA device index of this rank (default: the current CuPy device).
        timeout: seconds a pass's all-reduce may take (None: :func:`cusyncbn.set_collective_timeout`,
            else ``CUSYNCBN_TIMEOUT``, else 600).

    The host never waits in an NCCL all-reduce; a watchdog thread (``cusyncbn._watchdog``)
    watches each pass's completion instead: a pass stuck behind a collective that another
    rank will never join (it finished its script after fewer collectives) ends the job at
    once, one that does not complete within the timeout ends it after a stall report at
    half the timeout (this communicator is aborted first, which unblocks the kernel).

    The first all-reduce of each buffer length checks over MPI, on the host, that every
    rank passes that length (NCCL would hang or read past the shorter buffer); later ones
    are NCCL only. Building one makes a failing rank end the job, aborting this NCCL
    communicator first (see :func:`cusyncbn.set_abort_on_failure`).

    Raises:
        RuntimeError: NCCL is not available, or two ranks of the group share one GPU
            (NCCL refuses that: "Duplicate GPU detected"); from ``allreduce``: the ranks
            passed buffers of different lengths.

    Example:
        >>> comm = cusyncbn.NCCLComm()                       # doctest: +SKIP
        >>> bn = cusyncbn.SyncBatchNorm(64, comm=comm)  # doctest: +SKIP
    """

    def __init__(self, mpi_comm: Any = None, device: int | None = None, *, timeout: float | None = None) -> None:
        import cupy
        from mpi4py import MPI
        mpi_comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.timeout = None if timeout is None else _watchdog.check_timeout(timeout, "NCCLComm")
        self.device = cupy.cuda.Device().id if device is None else int(device)
        problem = _nccl_problem(self.device)
        # Same host (or NCCL_HOSTID) and same GPU on two ranks: NCCL would refuse.
        where = (os.environ.get("NCCL_HOSTID") or socket.gethostname(), _device_uuid(self.device))
        everyone = mpi_comm.allgather((problem, where))
        problems = [p for p, _ in everyone if p]
        if problems:
            raise RuntimeError(f"NCCL cannot be used: {problems[0]}")
        places = [w for _, w in everyone]
        if len(set(places)) != len(places):
            raise RuntimeError("NCCL cannot be used: several ranks share one GPU (NCCL refuses this with "
                               "'Duplicate GPU detected'); give each rank its own GPU")
        from cupy.cuda import nccl
        self._nccl = nccl
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        with cupy.cuda.Device(self.device):
            self._comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._cupy = cupy
        self._lengths: set[int] = set()
        self.watch = _watchdog.Watch(mpi_comm, partial(peek_tag, self), repr(self)) if self.size > 1 else None
        _abort.install(nccl_comm=self)
        if self.size > 1:
            _watchdog.watch_gpu_passes()

    def allreduce(self, buf: Any) -> None:
        if buf.dtype.itemsize != 8 or buf.dtype.kind != "f":
            raise TypeError(f"NCCLComm.allreduce takes float64 buffers, got {buf.dtype}")
        agree_on_length(self.mpi_comm, self._lengths, buf.size, self)     # first use of a length only: host MPI
        # The current stream of this communicator's device (where the layer's kernels run),
        # whichever device is current in the calling thread.
        stream = self._cupy.cuda.get_current_stream(self.device).ptr
        self._comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._nccl.NCCL_FLOAT64,
                             self._nccl.NCCL_SUM, stream)

    def prepare_allreduce(self, buf: Any, stream: int) -> Any:
        """The all-reduce of ``buf`` on ``stream`` as a callable of no arguments: NCCL's call
        with every argument bound (a planned pass makes it with no Python frame). The
        checks of :meth:`allreduce` (dtype, the length agreed across ranks) are made here."""
        if buf.dtype.itemsize != 8 or buf.dtype.kind != "f":
            raise TypeError(f"NCCLComm.allreduce takes float64 buffers, got {buf.dtype}")
        agree_on_length(self.mpi_comm, self._lengths, buf.size, self)
        return partial(self._comm.allReduce, buf.data.ptr, buf.data.ptr, buf.size, self._nccl.NCCL_FLOAT64,
                       self._nccl.NCCL_SUM, stream)

    def abort(self) -> None:
        """Abort the NCCL communicator (``ncclCommAbort``): operations in flight end, and it
        cannot be used again. Done before ``MPI_Abort`` when a rank fails (see cusyncbn._abort)."""
        self._comm.abort()

    def __repr__(self) -> str:
        return f"NCCLComm(rank={self.rank}, size={self.size}, device={self.device})"


def _nccl_problem(device: int) -> str:
    try:
        from cupy.cuda import nccl
        if not nccl.available:
            return "CuPy was built without NCCL (pip install nvidia-nccl-cu12 / -cu13)"
    except ImportError as exc:
        return f"cupy.cuda.nccl does not import ({exc})"
    return ""


def _device_uuid(device: int) -> str:
    import cupy
    try:
        return str(cupy.cuda.runtime.getDeviceProperties(device).get("uuid", device))
    except Exception:
        return f"device{device}"


def nccl_or_fallback(mpi_comm: Any, device: str) -> Any:
    """NCCL on ``device`` when every rank can use it, else MPI with a one-line warning."""
    index = int(device.split(":")[1])
    try:
        return NCCLComm(mpi_comm, index)
    except RuntimeError as exc:
        warnings.warn(f"cusyncbn: {exc}; falling back to a host-staged MPI all-reduce (slower, "
                      "synchronizes with the host)", RuntimeWarning, stacklevel=3)
        return MPIComm(mpi_comm)
