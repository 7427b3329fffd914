"""The Python-side cost of a layer call on the GPU code path, measurable without a GPU.

``StubBackend`` is the real :class:`~cusyncbn._backend_cupy.CupyBackend` (launch plans,
alignment checks, workspaces, argument tuples) with CuPy's arrays replaced by NumPy
arrays and every kernel launch by a no-op, so what runs is cusyncbn's own host code:
the layer, the functional core, the checks and the backend. CuPy's launch cost (a few
microseconds per kernel, two per pass) and NCCL's come on top on a GPU, where
``python -m cusyncbn.bench`` measures the whole.

``StubBackend`` is also the base of the kernel emulator (``tests/cuda_emu``). The measure
of host work is :func:`ledger`: the real GPU code path (``CupyBackend``, the flag slots,
NCCL's call) run against a recording stand-in for CuPy (``cusyncbn._recording``), which
counts per pass what costs host time on a GPU machine: launches (and the arguments
wrapped per launch), NCCL calls, allocations, views, device-to-host copies, events,
device switches, stream lookups and cusyncbn's Python frames.
``python -m cusyncbn._hostcost`` prints it, with a host time predicted from unit costs
profiled on the H200; CI holds it under a budget (``BUDGET``), so that host work added
to the per-call path shows up as a failing test rather than as a slower GPU benchmark.
"""
from __future__ import annotations

import contextlib
from operator import attrgetter
from typing import Any

import numpy as np

from . import _flags, _planned
from ._backend import Backend, swap_backend
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


# Host time per unit of work, profiled on the H200 on 2026-11-29 (``../perf/h200-2026-11-29.md``,
# upper bounds under cProfile), in microseconds. ``launch`` is a RawKernel.__call__ launch
# without its arguments (each argument wrapper adds ``argument``); a pre-packed driver launch
# is counted at ``launch`` alone, which overstates it. ``event`` is an estimate (not profiled).
UNIT_US = {"launch": 6.5, "argument": 1.05, "allocation": 11.0, "view": 4.0, "device_switch": 1.4, "nccl": 3.0,
           "copy": 22.0, "event": 3.0, "frame": 1.2}
LEDGER_FIELDS = ("launches", "nccl", "allocations", "views", "copies", "events", "device_switches",
                 "stream_lookups", "frames")
#: The budget CI holds (issue 15): per training pass, the mean of a forward and a backward.
BUDGET = {"launches": 2, "nccl": 1, "allocations": 1, "views": 0, "copies": 0, "events": 0, "device_switches": 1,
          "stream_lookups": 1, "frames": 15}


class _RecordedNccl:
    """A two-rank communicator over the stand-in's NCCL (NCCLComm's calls, without MPI): the
    payload is handed to ``allReduce`` exactly as ``NCCLComm`` hands it."""

    rank, size = 0, 2

    def __init__(self) -> None:
        from cupy.cuda import nccl
        self._nccl = nccl
        self._comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)

    def allreduce(self, buf: Any) -> None:
        import cupy
        stream = cupy.cuda.get_current_stream(0).ptr
        self._comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._nccl.NCCL_FLOAT64, self._nccl.NCCL_SUM,
                             stream)

    def prepare_allreduce(self, buf: Any, stream: int) -> Any:
        from functools import partial
        return partial(self._comm.allReduce, buf.data.ptr, buf.data.ptr, buf.size, self._nccl.NCCL_FLOAT64,
                       self._nccl.NCCL_SUM, stream)


def ledger(shape: tuple = SHAPE, warm: int = 3) -> dict[str, dict[str, int]]:
    """The host work of one pass of the public layer on the GPU code path: the real
    ``CupyBackend``, functional core and layer against the recording stand-in for CuPy
    (``cusyncbn._recording``), after ``warm`` training steps.

    Returns:
        ``{"forward": {...}, "backward": {...}, "eval": {...}, "training pass": {...}}``:
        per pass the ledger's counters (see ``_recording.Ledger``) and ``frames`` (cusyncbn
        Python frames); "training pass" is the mean of the forward and the backward,
        rounded up.
    """
    from . import _recording
    from ._layer import SyncBatchNorm
    from ._grad_mode import no_grad
    with _recording.installed() as record:
        previous = swap_backend("gpu:0", None)
        try:
            import cupy
            comm = _RecordedNccl()
            train = SyncBatchNorm(shape[1], device="gpu:0", comm=comm)
            evaluation = SyncBatchNorm(shape[1], device="gpu:0", comm=comm).eval()
            x = cupy.zeros(shape, np.float32)
            dy = cupy.zeros(shape, np.float32)
            for _ in range(warm):
                train.backward(train(x))
                with no_grad():
                    evaluation(x)
            out: dict[str, dict[str, int]] = {}
            held: list = []

            def forward() -> None:
                held.append(train(x))

            def backward() -> None:
                train.backward(dy)

            def eval_forward() -> None:
                with no_grad():
                    evaluation(x)
            for name, fn in (("forward", forward), ("backward", backward), ("eval", eval_forward)):
                record.reset()
                frames = _recording.count_frames(fn)
                counts = record.snapshot()
                counts["frames"] = frames
                out[name] = counts
        finally:
            # Leave nothing of the stand-in behind: its report slots (never written: its
            # kernels do not run) and its plans.
            _flags.flush()
            _planned.clear()
            swap_backend("gpu:0", previous)
    out["training pass"] = {k: -(-(out["forward"][k] + out["backward"][k]) // 2) for k in out["forward"]}
    return out


def predicted_us(counts: dict[str, int]) -> float:
    """Host time of a pass with ``counts`` from the H200 unit costs (``UNIT_US``), in us."""
    return (counts["launches"] * UNIT_US["launch"] + counts.get("launch_args", 0) * UNIT_US["argument"]
            + counts["allocations"] * UNIT_US["allocation"] + counts["views"] * UNIT_US["view"]
            + counts["device_switches"] * UNIT_US["device_switch"] + counts["nccl"] * UNIT_US["nccl"]
            + counts["copies"] * UNIT_US["copy"] + counts["events"] * UNIT_US["event"]
            + counts["frames"] * UNIT_US["frame"])


def ledger_line(counts: dict[str, int]) -> str:
    """The ledger's closing line (its format is fixed: CI and the issue read it)."""
    c = counts
    return (f"ledger per training pass: launches {c['launches']}, nccl {c['nccl']}, allocations {c['allocations']}, "
            f"views {c['views']}, copies {c['copies']}, events {c['events']}, device switches "
            f"{c['device_switches']}, stream lookups {c['stream_lookups']}, frames {c['frames']}")


def main() -> None:
    result = ledger()
    for name in ("forward", "backward", "eval"):
        counts = result[name]
        print(f"{name:9s}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f"; predicted host time {predicted_us(counts):.1f} us (H200 unit costs)")
    print(f"predicted host time per training pass: {predicted_us(result['training pass']):.1f} us "
          "(H200 unit costs, 2026-11-29; the benchmark prints the measured one beside it)")
    print(ledger_line(result["training pass"]))


if __name__ == "__main__":
    main()
