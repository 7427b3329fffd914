"""The GPU backend's host code on NumPy arrays, with kernels that do nothing (no GPU needed).

``StubBackend`` is the real :class:`~cusyncbn._backend_cupy.CupyBackend` (launch plans,
alignment checks, workspaces, argument tuples) with CuPy's arrays replaced by NumPy arrays
and every kernel launch by a no-op, so what runs is cusyncbn's own host code: the layer,
the functional core, the checks and the backend. It is the base of the kernel emulator
(``tests/cuda_emu``, whose ``EmuBackend`` runs real kernels); :func:`stubbed` installs one
as the CPU's backend for tests of the GPU path's host-side checks.
"""
from __future__ import annotations

import contextlib
from operator import attrgetter
from typing import Any

import numpy as np

from cusyncbn import _flags
from cusyncbn._backend import Backend, swap_backend
from cusyncbn._backend_cupy import CupyBackend
from cusyncbn._backend_numpy import NumpyBackend


class StubBackend(CupyBackend):
    """``CupyBackend`` on NumPy arrays whose kernels do nothing (``sms`` sizes the grids)."""

    import_array = NumpyBackend.import_array
    is_native = NumpyBackend.is_native

    array_types: tuple = (np.ndarray,)

    def __init__(self, sms: int = 132) -> None:
        Backend.__init__(self)
        self.xp = np
        self.device = "cpu"
        self.arch = "stub"
        self._index = self.index = 0
        self._cuda_device = contextlib.nullcontext()
        self._sms = sms
        self._init_plans()
        self._ring = self._make_ring()
        self.table = {}
        self.current_device = _device_zero
        self.current_stream = _default_stream
        self.pointer = attrgetter("ctypes.data")
        for cls in self.array_types:
            self.accept_array_type(cls, self.pointer, attrgetter("strides"))

    def stream_key(self) -> int:
        return 0

    def _make_ring(self, size: int = 1024) -> Any:
        return _flags.host_ring(size)

    def address_of(self, a: Any) -> int:
        return a.ctypes.data

    def packed_launcher(self, plan: Any, args: Any, stream: int) -> Any:
        return _no_op_packed

    def capturing(self) -> bool:
        return False

    def empty(self, shape: Any, dtype: Any) -> Any:
        # Zeros: the no-op kernels never write the statistics' flags, which must read "nothing found".
        return np.zeros(shape, dtype)

    @staticmethod
    def _address(a: Any) -> int:
        return a.ctypes.data

    @staticmethod
    def _resources(kernel: Any) -> tuple[int, int]:
        return 64, 0

    def _kernel(self, dtype_name: str, key: str, loads: int) -> Any:
        return _no_op


def _no_op(grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
    return None


def _no_op_packed() -> None:
    return None


class _DefaultStream:
    """The stand-in's one stream: CUDA's default stream, never capturing."""

    ptr = 0

    @staticmethod
    def is_capturing() -> bool:
        return False


_STREAM = _DefaultStream()


def _default_stream() -> _DefaultStream:
    return _STREAM


def _device_zero() -> int:
    return 0


@contextlib.contextmanager
def stubbed() -> Any:
    """Within this block, CPU layers run on a :class:`StubBackend` (the GPU backend's host code
    on NumPy arrays, kernels not run)."""
    stub = StubBackend()
    previous = swap_backend("cpu", stub)
    try:
        yield stub
    finally:
        swap_backend("cpu", previous)
