"""Reporting what the passes found (``stats.flags``: non-finite statistics, ranks out of step).

On the CPU the flags are read as soon as a pass has written them. On the GPU reading
them at once would synchronize the host with the device on every call; instead each
pass queues an asynchronous copy of its two flags into pinned host memory behind its
kernels, and the next call into cusyncbn (any layer, any pass) reports every copy that
has landed, without waiting for those that have not. :func:`flush` waits for all.

Nothing is queued or queried while the current stream is being captured into a CUDA
graph (an event query is illegal then): the kernels still leave the running statistics
unchanged, but a graph's replays report nothing.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np

_pending: deque = deque()
_spare: dict = {}                # (device, dtype) -> spare (event, pinned 2-value buffer) pairs


def watch(flags: Any, report: Callable[[Any], None]) -> None:
    """Call ``report(host_flags)`` once the device has written ``flags`` (2 values)."""
    if isinstance(flags, np.ndarray):
        report(flags)
        return
    import cupy
    from cupyx import empty_pinned
    key = (flags.device.id, flags.dtype)
    with flags.device:
        stream = cupy.cuda.get_current_stream()
        if stream.is_capturing():
            return
        spare = _spare.get(key)
        if spare:
            event, host = spare.pop()
        else:
            event, host = cupy.cuda.Event(block=False, disable_timing=True), empty_pinned((2,), flags.dtype)
        flags.get(stream=stream, out=host, blocking=False)
        event.record(stream)
    _pending.append((key, event, host, report))


def _capturing() -> bool:
    import cupy
    return cupy.cuda.get_current_stream().is_capturing()


def poll() -> None:
    """Report every queued copy that has completed (in order), without waiting."""
    if not _pending or _capturing():
        return
    while _pending and _pending[0][1].done:
        key, event, host, report = _pending.popleft()
        try:
            report(host)
        finally:
            spare = _spare.setdefault(key, [])
            if len(spare) < 64:                 # events and pinned buffers are reused, not remade
                spare.append((event, host))


def flush() -> None:
    """Wait for every queued copy and report it."""
    if not _pending or _capturing():
        return
    while _pending:
        _pending[0][1].synchronize()
        poll()
