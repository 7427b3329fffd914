"""The Python-side cost of a layer call on the GPU code path, measurable without a GPU.

``StubBackend`` is the real :class:`~cusyncbn._backend_cupy.CupyBackend` (launch plans,
alignment checks, workspaces, argument tuples) with CuPy's arrays replaced by NumPy
arrays and every kernel launch by a no-op, so what runs is cusyncbn's own host code:
the layer, the functional core, the checks and the backend. CuPy's launch cost (a few
microseconds per kernel, two per pass) and NCCL's come on top on a GPU, where
``python -m cusyncbn.bench`` measures the whole.

Two measures: the wall time per call (``python -m cusyncbn._hostcost``, reported in
docs/PERFORMANCE.md; it depends on the machine) and the number of Python function calls
per pass (:func:`count_calls`, deterministic: CI holds it under a budget, so that host
work added to the per-call path shows up as a failing test rather than as a slower GPU
benchmark weeks later).
"""
from __future__ import annotations

import contextlib
import sys
import time
from operator import attrgetter
from typing import Any, Callable

import numpy as np

from . import _flags
from ._backend import Backend, get_backend, swap_backend
from ._backend_cupy import CupyBackend
from ._backend_numpy import NumpyBackend

SHAPE = (2, 256, 4, 4)           # tiny: host-bound, as the benchmark's host measurement


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
        self.table = {}
        self.current_device = _device_zero
        self.current_stream = _default_stream
        self.pointer = attrgetter("ctypes.data")

    def stream_key(self) -> int:
        return 0

    def report_ring(self) -> Any:
        if self._ring is None:
            self._ring = _flags.host_ring()
        return self._ring

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
    """Within this block, CPU layers run on a :class:`StubBackend`."""
    stub = StubBackend()
    previous = swap_backend("cpu", stub)
    try:
        yield stub
    finally:
        swap_backend("cpu", previous)


def passes() -> dict[str, Callable[[], None]]:
    """One callable per measured pass on a fresh layer (call inside :func:`stubbed`)."""
    import cusyncbn
    train = cusyncbn.SyncBatchNorm(SHAPE[1], device="cpu", comm=cusyncbn.SingleProcessComm())
    evaluation = cusyncbn.SyncBatchNorm(SHAPE[1], device="cpu", comm=cusyncbn.SingleProcessComm()).eval()
    x = np.ones(SHAPE, np.float32)
    dy = np.ones_like(x)
    assert isinstance(get_backend("cpu"), StubBackend)

    def training_step() -> None:
        train(x)
        train.backward(dy)

    def eval_forward() -> None:
        with cusyncbn.no_grad():
            evaluation(x)

    return {"training forward+backward": training_step, "eval forward (no_grad)": eval_forward}


def count_calls(fn: Callable[[], None], warm: int = 3) -> int:
    """Python and C function calls made by ``fn()`` (after ``warm`` calls fill the caches)."""
    for _ in range(warm):
        fn()
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def microseconds(fn: Callable[[], None], calls: int = 5000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    with stubbed():
        for name, fn in passes().items():
            print(f"{name:26s}: {microseconds(fn):6.1f} us, {count_calls(fn)} Python/C calls "
                  f"(launches stubbed)")


if __name__ == "__main__":
    main()
