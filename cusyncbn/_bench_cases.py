"""The benchmark's cases, its 1-rank communicator and its two timers (CUDA events, the host
clock): the home that ``bench.py`` (timing), ``_sweep.py`` (launch-configuration tuning) and
``_bench_model.py`` (the ResNet-50 step) all import, so that none of them imports another.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable

SHAPES = [(64, 256, 56, 56), (4, 256, 128, 128), (64, 2048, 7, 7), (32, 64, 112, 112), (64, 1024, 14, 14),
          (2, 512, 32, 32)]
QUICK_SHAPES = [(64, 256, 56, 56), (64, 2048, 7, 7), (2, 512, 32, 32)]
DTYPES = ["float32", "float16", "bfloat16"]
LAYOUTS = ["NCHW", "NHWC"]
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def configurations(shapes: list) -> list:
    """``(shape, dtype, layout)`` of every configuration the benchmark runs on ``shapes``, in the
    order it runs them (shape, then dtype, then layout): the order of the timed rows and of the
    passes ``--profile`` hands to Nsight Compute."""
    return [(shape, dtype, layout) for shape in shapes for dtype in DTYPES for layout in LAYOUTS]


_COMM: dict[str, Any] = {}


def nccl_comm() -> Any:
    """One NCCL communicator of this process alone, built on first use and shared by every
    measurement (a ``SingleProcessComm`` when NCCL is not available: the kernels are still timed)."""
    if "comm" not in _COMM:
        import cusyncbn
        try:
            _COMM["comm"] = cusyncbn.NCCLComm()
        except Exception as exc:                           # no NCCL: still time the kernels
            print(f"note: NCCLComm unavailable ({exc}); timing with SingleProcessComm", file=sys.stderr)
            _COMM["comm"] = cusyncbn.SingleProcessComm()
    return _COMM["comm"]


def cuda_ms(fn: Callable[[], Any], reps: int = 1, warmup: int = 0) -> float:
    """Median milliseconds of ``reps`` calls of ``fn()``, each between two CUDA events recorded
    on the current stream (torch's default stream too), after ``warmup`` untimed calls and a
    device synchronization."""
    import cupy
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def host_us(fn: Callable[[], Any], runs: int = 1, warmup: int = 0,
            synchronize: Callable[[], Any] = lambda: None) -> float:
    """Host microseconds per call of ``fn()``: the mean over ``runs`` calls made back to back,
    after ``warmup`` untimed ones. ``synchronize()`` (e.g. a device synchronization) runs before
    the clock starts and after it stops, so that neither earlier work nor the wait for this
    work is counted."""
    for _ in range(warmup):
        fn()
    synchronize()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    t1 = time.perf_counter()
    synchronize()
    return (t1 - t0) / runs * 1e6
