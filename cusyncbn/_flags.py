"""Reporting what the passes found (non-finite statistics, ranks out of step).

On the CPU the flags are read as soon as a pass has written them (:func:`watch`). On the
GPU reading them at once would synchronize the host with the device on every call, and
even an asynchronous copy costs a copy and an event per pass. Instead each pass that
reports is handed a slot of a :class:`ReportRing`, 64-bit words of pinned host memory
that the device addresses directly (under unified addressing, memory from
``cudaHostAlloc`` is mapped into the device's address space at the same address), and a
sequence number ``seq``. The kernel that computes the pass's flag bits stores
``(seq << 24) | (channel + 1) << 2 | bits`` into its slot with one system-scope store
(``channel``: the first channel whose statistics are not finite, -1 for none); the host reads the slot
at a later call into cusyncbn (any layer, any pass) with no CUDA call at all, and knows
the value is final when it carries ``seq``. :func:`flush` synchronizes and reports every
pass still pending.

Nothing is claimed while the current stream is being captured into a CUDA graph: the
kernels still leave the running statistics unchanged on a bad step, but a graph's
replays report nothing (a replay would rewrite a slot with the sequence number of the
capture).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

SEQ_BITS = 40                       # (seq << 24) | (channel + 1) << 2 | bits fits 64 bits
SEQ_SHIFT = 24
#: Passes claimed and not yet reported: (ring, index, seq, report), in claim order. Read it
#: (truthiness) to skip :func:`poll` when empty; change it only through this module.
queue: deque = deque()
_pending = queue
_seq = 0
_lock = threading.Lock()
_now = time.monotonic
_CODE = (1 << SEQ_SHIFT) - 1         # what a report gets: bits | (first non-finite channel + 1) << 2


def watch(flags: Any, report: Callable[[int], None]) -> None:
    """Report host flags (a NumPy array of one value) at once: ``report(int(flags[0]))``.

    A report gets a code: ``code & 3`` the flag bits, ``(code >> 2) - 1`` the first channel
    whose statistics are not finite (-1: none, or not known, as here)."""
    report(int(flags[0]))


class ReportRing:
    """``size`` 64-bit report slots in host memory the device can write.

    Args:
        host: a NumPy ``uint64`` array of the slots (pinned, mapped memory on a GPU).
        address: the slots' device address (the host address under unified addressing).
        synchronize: waits until every kernel queued on the ring's device has run.
    """

    __slots__ = ("host", "address", "size", "synchronize", "busy", "cursor")

    def __init__(self, host: Any, address: int, synchronize: Callable[[], None]) -> None:
        self.host, self.address, self.size, self.synchronize = host, int(address), int(host.size), synchronize
        self.busy = 0               # slots claimed and not yet reported: the window before cursor
        self.cursor = 0             # the next slot to claim


def claim(ring: ReportRing, report: Callable[[int], None], info: tuple | None = None) -> tuple[int, int]:
    """A slot of ``ring`` for one pass: ``(slot address, seq)`` to hand to its kernel;
    ``report(bits)`` is called by the first :func:`poll` that finds the slot written.
    ``info``, ``(layer name, pass, communicator, tag)``, is for the watchdog (``_watchdog``).

    When every slot of the ring is still pending (a queue of ``ring.size`` unreported
    passes), the ring's device is synchronized first, the one case that waits: what landed
    is kept for the next poll and the slots are free again. Nothing is reported here (a
    claim sits in the middle of a pass).
    """
    global _seq
    if ring.busy >= ring.size:
        ring.synchronize()
        _settle(ring)
    with _lock:                                          # threads may claim concurrently
        _seq = seq = (_seq + 1) & ((1 << SEQ_BITS) - 1)
        index = ring.cursor
        ring.cursor = (index + 1) % ring.size
        ring.busy += 1
        _pending.append([ring, index, seq, report, None, info, _now()])
    return ring.address + 8 * index, seq


def poll() -> None:
    """Report, in order, every pending pass whose slot has been written; never waits."""
    while _pending:
        with _lock:
            if not _pending:
                return
            ring, index, seq, report, landed = _pending[0][:5]
            value = int(ring.host[index]) if landed is None else landed
            if value >> SEQ_SHIFT != seq:
                return
            _pending.popleft()
            if landed is None:
                ring.busy -= 1
        report(value & _CODE)


def pending() -> bool:
    """Whether some pass has not been reported yet."""
    return bool(_pending)


class PendingPass:
    """A read-only view of one pending pass (for the watchdog thread)."""

    __slots__ = ("ring", "index", "seq", "landed", "info", "claimed")

    def __init__(self, entry: list) -> None:
        self.ring, self.index, self.seq, _, self.landed, self.info, self.claimed = entry

    def written(self) -> bool:
        """Whether its kernel has published its report (the pass got past its all-reduce)."""
        return self.landed is not None or int(self.ring.host[self.index]) >> SEQ_SHIFT == self.seq


def pending_entries() -> list[PendingPass]:
    """The pending passes, oldest first (a snapshot, safe from any thread)."""
    with _lock:
        return [PendingPass(entry) for entry in _pending]


def flush() -> None:
    """Wait for every pending pass (a device synchronization per ring) and report it;
    passes whose kernels never ran (captured into a graph) are dropped."""
    if not _pending:
        return
    for ring in {id(entry[0]): entry[0] for entry in _pending}.values():
        ring.synchronize()
    while _pending:
        with _lock:
            if not _pending:
                return
            ring, index, seq, report, landed = _pending.popleft()[:5]
            value = int(ring.host[index]) if landed is None else landed
            if landed is None:
                ring.busy -= 1
        if value >> SEQ_SHIFT == seq:
            report(value & _CODE)


def _settle(ring: ReportRing) -> None:
    """After a synchronization of ``ring``'s device: keep the values that landed in their
    entries (reported in order by the next poll), drop the passes that never ran, and free
    every slot of the ring."""
    with _lock:
        kept = []
        for entry in _pending:
            if entry[0] is ring and entry[4] is None:
                value = int(ring.host[entry[1]])
                if value >> SEQ_SHIFT != entry[2]:
                    continue                             # never ran (e.g. captured into a graph)
                entry[4] = value
            kept.append(entry)
        _pending.clear()
        _pending.extend(kept)
        ring.busy = 0
        ring.cursor = 0


def host_ring(size: int = 1024) -> ReportRing:
    """A ring in ordinary host memory, for backends whose kernels run on the host (tests,
    the emulator)."""
    host = np.zeros(size, np.uint64)
    return ReportRing(host, host.ctypes.data, lambda: None)
