"""CuPy's handle on a framework's CUDA stream, made once per stream and shared by the torch
and Paddle adapters.

The adapters run cusyncbn's kernels on the framework's current stream: with CuPy's current
stream set to a ``cupy.cuda.ExternalStream`` wrapping it, they queue behind the
framework's own work with no cross-stream event, and a CUDA graph capture records them.
Making the wrapper costs microseconds per call, so one is kept per (device, stream);
the most recently used 64 are kept, so that a program making streams as it goes does not
keep every one alive. CuPy is imported only when a wrapper is made.
"""
from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=64)
def external_stream(index: int, ptr: int) -> Any:
    """``cupy.cuda.ExternalStream(ptr, index)``, made once per ``(index, ptr)``.

    Args:
        index: the CUDA device the stream belongs to.
        ptr: the stream's handle (``cudaStream_t`` as an int), as the framework gives it
            (``torch.cuda.current_stream(i).cuda_stream``, Paddle's ``.cuda_stream``).

    Returns:
        The wrapper, usable as a context (``with external_stream(i, p):``) in which
        CuPy's current stream on device ``index`` is that one.
    """
    import cupy
    return cupy.cuda.ExternalStream(ptr, index)
