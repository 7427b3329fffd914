"""The communicator of a layer or function call: the default one and the wrapping of an
mpi4py communicator, each built once and shared; and, for a layer that will use the
default one, starting MPI (with the failure hooks) when the layer is built.

Above the communicators it builds (``_comm.py``: single-process and MPI; ``_nccl.py``:
NCCL, which falls back to MPI), as cupyx keeps ``_init.py`` above ``_comm.py`` and
``_nccl_comm.py``: nothing below imports this module. mpi4py is imported only when an
MPI communicator is actually needed.
"""
from __future__ import annotations

from typing import Any

from . import _abort
from ._comm import Communicator, MPIComm, SingleProcessComm, launched_size, mpi_is_running


def _is_mpi4py_comm(obj: Any) -> bool:
    return type(obj).__module__ == "mpi4py.MPI"


_default_cache: dict[str, Communicator] = {}


def default_comm(device: str) -> Communicator:
    """The communicator used when a layer is given ``comm=None``.

    All processes of ``MPI.COMM_WORLD`` when the program runs under an MPI launcher
    with more than one process (or MPI is already initialised with several), else a
    single-process communicator. On a GPU device this is an NCCL communicator,
    falling back to :class:`MPIComm` with a warning when NCCL cannot be used.
    Built once per device and shared by all layers.
    """
    if device in _default_cache:
        return _default_cache[device]
    multi = launched_size() > 1
    if not multi and mpi_is_running():
        from mpi4py import MPI
        multi = MPI.COMM_WORLD.Get_size() > 1
    if not multi:
        comm: Communicator = SingleProcessComm()
    elif device == "cpu":
        comm = MPIComm()
    else:
        from ._nccl import nccl_or_fallback
        comm = nccl_or_fallback(None, device)
    _default_cache[device] = comm
    return comm


def start_launched_mpi() -> bool:
    """Under an MPI launcher with more than one process, start MPI now and install the
    failure hooks (``cusyncbn._abort``): a rank that fails before its first collective then
    ends the job too, instead of leaving the others waiting in it. A layer built without
    ``comm`` calls this; its communicator (:func:`default_comm`) is built at its first
    forward, which would start MPI only then.

    Returns:
        Whether MPI was started (False in a single process: nothing is imported).
    """
    if launched_size() <= 1:
        return False
    from mpi4py import MPI  # noqa: F401  (importing mpi4py.MPI initialises MPI)
    _abort.install()
    return True


_adopted: dict[tuple[int, str], tuple[Any, Communicator]] = {}
_accepted: set = set()


def resolve_comm(comm: Any, device: str) -> Communicator:
    """Turn the ``comm=`` argument of a layer or function into a communicator object.

    An mpi4py communicator is wrapped once per device (an NCCL communicator is costly to
    build) and the wrapper reused by every later call with the same mpi4py object.
    """
    if comm is None:
        return default_comm(device)
    if _is_mpi4py_comm(comm):
        key = (id(comm), device)
        known = _adopted.get(key)
        if known is not None and known[0] is comm:
            return known[1]
        if device == "cpu":
            wrapped: Communicator = MPIComm(comm)
        else:
            from ._nccl import nccl_or_fallback
            wrapped = nccl_or_fallback(comm, device)
        _adopted[key] = (comm, wrapped)
        return wrapped
    if type(comm) in _accepted or (isinstance(comm, Communicator) and isinstance(getattr(comm, "size", None), int)):
        # (a runtime Protocol check costs ~10 us: done once per communicator class)
        _accepted.add(type(comm))
        return comm
    raise TypeError("comm must be None, an mpi4py communicator or an object with rank, size and "
                    f"allreduce(buf) (e.g. cusyncbn.MPIComm), got {type(comm).__name__}")
