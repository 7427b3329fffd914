"""Communicators: the one thing the layer needs from the outside world.

A communicator has a ``rank``, a ``size`` and one operation, an in-place sum
all-reduce of a 1-D float64 array of the backend's kind (NumPy or CuPy). The
layer makes exactly one such call per training forward and one per training
backward; everything else (counts, means, the combine) is arithmetic on the
reduced buffer.

mpi4py is imported only when an MPI communicator is actually built.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import _abort, _watchdog
from ._backend import BackwardPayload, ForwardPayload

# Environment variables that MPI launchers (Hydra/MPICH, Open MPI, PMIx, Slurm,
# MVAPICH) set in every process they start; read without initialising MPI.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")


@runtime_checkable
class Communicator(Protocol):
    """What cusyncbn needs from a communicator.

    Attributes:
        rank: this process's index in the group, ``0 <= rank < size``.
        size: number of processes in the group.
    """

    rank: int
    size: int

    def allreduce(self, buf: Any) -> None:
        """Sum ``buf`` (1-D float64, NumPy or CuPy) over the group, in place."""


class SingleProcessComm:
    """The trivial communicator: one process, all-reduce is the identity.

    Example:
        >>> from cusyncbn import SingleProcessComm
        >>> SingleProcessComm().size
        1
    """

    rank = 0
    size = 1

    def allreduce(self, buf: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "SingleProcessComm()"


class MPIComm:
    """All-reduce over an mpi4py communicator.

    NumPy buffers are reduced in place. CuPy buffers are staged through host memory
    (a device-to-host copy and a synchronization: the fallback used when NCCL is not
    available; :class:`cusyncbn.NCCLComm` avoids it). The first all-reduce of each
    buffer length first checks that every rank passes that length (see
    :func:`agree_on_length`). Building one in a job of several MPI processes makes a
    failing rank end the job (see :func:`cusyncbn.set_abort_on_failure`).

    Every all-reduce is watched (``cusyncbn._watchdog``): a rank waiting in one that another
    rank will never join (it finished its script after fewer collectives) ends the job at
    once with a message naming both; one that does not complete within the timeout ends
    it after a stall report at half the timeout.

    Args:
        mpi_comm: an ``mpi4py.MPI.Comm`` (intra-communicator), e.g. ``MPI.COMM_WORLD``
            or ``MPI.COMM_WORLD.Split(rank // 2)``. Default: ``MPI.COMM_WORLD``.
        timeout: seconds a collective may take (None: :func:`cusyncbn.set_collective_timeout`,
            else ``CUSYNCBN_TIMEOUT``, else 600).

    Raises:
        TypeError: ``mpi_comm`` is not an mpi4py intra-communicator.
        ValueError: ``timeout`` is not a number of seconds > 0.
        RuntimeError (from ``allreduce``): the ranks passed buffers of different lengths,
            or MPI failed; the message says what this rank passed.
        TimeoutError (from ``allreduce``): a stuck collective, when failures are left to the
            program (``set_abort_on_failure(False)``); otherwise the job ends.

    Example:
        >>> from mpi4py import MPI            # doctest: +SKIP
        >>> comm = cusyncbn.MPIComm(MPI.COMM_WORLD.Split(MPI.COMM_WORLD.rank // 2))  # doctest: +SKIP
    """

    def __init__(self, mpi_comm: Any = None, *, timeout: float | None = None) -> None:
        from mpi4py import MPI
        if mpi_comm is None:
            mpi_comm = MPI.COMM_WORLD
        if not isinstance(mpi_comm, MPI.Intracomm):
            raise TypeError(f"MPIComm needs an mpi4py intra-communicator, got {type(mpi_comm).__name__}")
        self._mpi = MPI
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.timeout = None if timeout is None else _watchdog.check_timeout(timeout, "MPIComm")
        self._lengths: set[int] = set()
        # All-reduces made through this object: what the early-exit notices count (a wrapper
        # around this communicator may number the layers' collectives its own way).
        self.collectives = 0
        # The side channel of early-exit notices (a collective Dup, as building this is).
        self.watch = _watchdog.Watch(mpi_comm, partial(getattr, self, "collectives"), repr(self)) \
            if self.size > 1 else None
        _abort.install()

    def allreduce(self, buf: Any) -> None:
        host = buf if isinstance(buf, np.ndarray) else buf.get()
        self.collectives += 1
        try:
            agree_on_length(self.mpi_comm, self._lengths, host.size, self)
            request = self.mpi_comm.Iallreduce(self._mpi.IN_PLACE, host, op=self._mpi.SUM)
            _watchdog.wait(request, self.watch, self, self.timeout, self.collectives)
        except self._mpi.Exception as exc:
            raise RuntimeError(_allreduce_failure(self, host.size, exc)) from exc
        if host is not buf:
            buf.set(host)

    def __repr__(self) -> str:
        return f"MPIComm(rank={self.rank}, size={self.size})"


def agree_on_length(mpi_comm: Any, agreed: set, count: int, comm: Any = None) -> None:
    """Before the first all-reduce of ``count`` values over ``mpi_comm``, check that every
    rank passes ``count`` values.

    Ranks passing buffers of different lengths to one all-reduce is a bug (most often a
    layer with different ``num_features`` on different ranks): MPICH then aborts the job
    with a bare "Message truncated", NCCL hangs or reads past the shorter buffer. Every
    rank of a correct program makes the same collectives in the same order, so all ranks
    meet each length for the first time together; checking then costs one all-reduce of
    two integers per distinct length and communicator, once. ``agreed`` holds the
    lengths already checked.

    Raises:
        RuntimeError: on every rank, naming each rank's length, when they differ.

    ``comm`` (the cusyncbn communicator, with its ``watch`` and ``timeout``) has the check
    watched as its all-reduces are.
    """
    if count in agreed:
        return
    from mpi4py import MPI
    ends = np.array([count, -count], dtype=np.int64)
    request = mpi_comm.Iallreduce(MPI.IN_PLACE, ends, op=MPI.MIN)
    _watchdog.wait(request, getattr(comm, "watch", None), comm if comm is not None else mpi_comm,
                   getattr(comm, "timeout", None), getattr(comm, "collectives", None))
    if ends[0] == -ends[1]:
        agreed.add(count)
        return
    by_length: dict[int, list[int]] = {}
    for rank, length in enumerate(mpi_comm.allgather(count)):
        by_length.setdefault(length, []).append(rank)
    found = "; ".join(f"{length} values ({_payload_guess(length)}) on rank{'s' * (len(ranks) > 1)} "
                      f"{', '.join(map(str, ranks))}" for length, ranks in sorted(by_length.items()))
    raise RuntimeError(f"cusyncbn: the ranks passed all-reduce buffers of different lengths: {found}. Every rank "
                       f"must make the same collective calls with the same sizes; {_MISMATCH_HINT}")


_MISMATCH_HINT = ("a layer probably has different num_features on different ranks, or the ranks call different "
                  "layers (debug=True or CUSYNCBN_DEBUG=1 also names the layer)")


def _payload_guess(count: int) -> str:
    """Which SyncBatchNorm collective has ``count`` values (the payload layouts of ``_backend``), if any."""
    forward, backward = ForwardPayload.channels_of(count), BackwardPayload.channels_of(count)
    if forward is not None:
        return f"like a forward of {forward} channels"
    if backward is not None:
        return f"like a backward of {backward} channels"
    return "not a layer's payload"


def _allreduce_failure(comm: Any, count: int, exc: Any) -> str:
    """What to say when an MPI all-reduce of ``count`` float64 values raised ``exc``."""
    text = (f"cusyncbn: the all-reduce of {count} float64 values ({_payload_guess(count)}) "
            f"failed on rank {comm.rank} of {comm.size} (MPI: {str(exc).splitlines()[0]})")
    if exc.Get_error_class() == comm._mpi.ERR_TRUNCATE:
        text += f": the ranks passed buffers of different lengths; {_MISMATCH_HINT}"
    return text


# Collective tags (see _backend.py): one counter per communicator object.
_TAG_LIMIT = 1 << 20
_tags: dict[int, list] = {}


def prepared_allreduce(comm: Any, buf: Any, stream: int) -> Any:
    """A callable of no arguments that all-reduces ``buf`` over ``comm`` on ``stream``:
    the communicator's own ``prepare_allreduce(buf, stream)`` where it has one (NCCL: the
    call with every argument bound), else ``comm.allreduce(buf)``; None for one process."""
    if comm is None or comm.size == 1 and isinstance(comm, SingleProcessComm):
        return None
    prepare = getattr(comm, "prepare_allreduce", None)
    if prepare is not None:
        return prepare(buf, stream)
    return partial(comm.allreduce, buf)


def next_tag(comm: Any) -> int:
    """Number the next collective on ``comm`` (1, 2, ... modulo 2^20)."""
    entry = _tags.get(id(comm))
    if entry is None or entry[0] is not comm:
        entry = _tags[id(comm)] = [comm, 0]
    entry[1] = (entry[1] + 1) % _TAG_LIMIT
    return entry[1]


def set_tag(comm: Any, tag: int) -> None:
    """Make ``tag`` the number of the last collective on ``comm`` (ranks re-aligning after an
    error that every rank saw)."""
    _tags[id(comm)] = [comm, int(tag) % _TAG_LIMIT]


def peek_tag(comm: Any) -> int:
    """The number of the last collective on ``comm`` (0 before the first)."""
    entry = _tags.get(id(comm))
    return entry[1] if entry is not None and entry[0] is comm else 0


def launched_size() -> int:
    """World size announced by an MPI launcher's environment, 1 if none."""
    for var in _SIZE_VARS:
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    return 1


def mpi_is_running() -> bool:
    """True when mpi4py is imported and MPI is initialised (does not import it)."""
    import sys
    mod = sys.modules.get("mpi4py.MPI")
    return bool(mod is not None and mod.Is_initialized() and not mod.Is_finalized())
