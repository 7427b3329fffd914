"""Which device new layers live on: ``"cpu"`` (NumPy) or ``"gpu:N"`` (CuPy).

Nothing here imports CuPy until a GPU is asked about, so ``import cusyncbn`` stays
cheap on machines without one.
"""
from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_current: str | None = None


def gpu_count() -> int:
    """Number of usable CUDA devices, 0 when CuPy or a driver is missing."""
    try:
        import cupy
    except ImportError:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver, driver too old, no device: all mean "no GPU"
        return 0


def node_local_rank() -> int:
    """This process's rank among the processes of its node (0 outside MPI).

    Read from the launcher's environment first (no MPI initialisation needed);
    otherwise from ``MPI.COMM_WORLD.Split_type(COMM_TYPE_SHARED)`` when mpi4py is
    already initialised.
    """
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                "SLURM_LOCALID", "MV2_COMM_WORLD_LOCAL_RANK"):
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    from ._comm import mpi_is_running
    if not mpi_is_running():
        return 0
    from mpi4py import MPI
    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank()
    finally:
        local.Free()


def parse_device(device: str) -> str:
    """The device named by ``device``, resolved: ``"cpu"`` or ``"gpu:N"``.

    Args:
        device: ``"cpu"``, ``"gpu"`` / ``"cuda"`` (the CUDA device of this process's
            node-local rank, modulo the device count) or ``"gpu:N"`` / ``"cuda:N"``; case
            and surrounding spaces are ignored.

    Raises:
        TypeError: ``device`` is not a string.
        ValueError: an unknown device string.
        RuntimeError: a GPU was asked for and none (or not that one) is usable.

    Example:
        >>> parse_device(" CPU ")
        'cpu'
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', 'gpu' or 'gpu:0', got {type(device).__name__}")
    name = device.strip().lower()
    if name == "cpu":
        return "cpu"
    if name in ("gpu", "cuda"):
        count = gpu_count()
        if count == 0:
            raise RuntimeError(f"device {device!r}: no usable CUDA device (is CuPy installed, "
                               "e.g. pip install 'cusyncbn[cuda12]', and a driver present?)")
        return f"gpu:{node_local_rank() % count}"
    for prefix in ("gpu:", "cuda:"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            index = int(name[len(prefix):])
            count = gpu_count()
            if index >= count:
                raise RuntimeError(f"device {device!r}: only {count} CUDA device(s) are usable")
            return f"gpu:{index}"
    raise ValueError(f"device must be 'cpu', 'gpu' or 'gpu:N', got {device!r}")


def set_device(device: str) -> str:
    """Choose the device on which layers created from now on keep their arrays.

    Args:
        device: ``"cpu"`` (NumPy), ``"gpu"`` (the CUDA device of this process's
            node-local rank, modulo the device count) or ``"gpu:N"``.

    Returns:
        The resolved device name, ``"cpu"`` or ``"gpu:N"``.

    Raises:
        ValueError: unknown device string.
        RuntimeError: a GPU was asked for and none is usable.

    Example:
        >>> import cusyncbn
        >>> cusyncbn.set_device("cpu")
        'cpu'
    """
    global _current
    resolved = parse_device(device)
    with _lock:
        _current = resolved
    return resolved


def get_device() -> str:
    """The current device: the one set by :func:`set_device`, else ``"gpu:N"``
    when a CUDA device is usable, else ``"cpu"``."""
    global _current
    with _lock:
        if _current is None:
            _current = parse_device("gpu") if gpu_count() > 0 else "cpu"
        return _current
