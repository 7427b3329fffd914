"""The backend of a device: built on first use, one per device.

Above ``_backend.py`` (the interface and the registry of built backends) and the two
backends it builds, ``_backend_numpy.py`` and ``_backend_cupy.py`` (as cupyx keeps its
``_init.py`` above ``_comm.py`` and ``_nccl_comm.py``): the backends import the interface,
this module imports the backends, and nothing below imports this module.
"""
from __future__ import annotations

from ._backend import Backend, backends


def get_backend(device: str) -> Backend:
    """The backend for ``"cpu"`` or ``"gpu:N"`` (one instance per device; a tool may put its
    own in place with :func:`cusyncbn._backend.swap_backend`)."""
    backend = backends.get(device)
    if backend is None:
        if device == "cpu":
            from ._backend_numpy import NumpyBackend
            backend = NumpyBackend()
        else:
            from ._backend_cupy import CupyBackend
            backend = CupyBackend(int(device.split(":")[1]))
        backends[device] = backend
    return backend
