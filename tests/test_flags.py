"""Reporting pass flags through host report slots (cusyncbn._flags): the protocol alone,
with a ring in ordinary host memory standing in for the pinned one and plain stores
standing in for the kernels' (the kernels' side runs in tests/test_kernels_emulated.py)."""
import numpy as np
import pytest

from cusyncbn import _flags


class Ring(_flags.ReportRing):
    """A 4-slot ring in host memory that counts its synchronizations."""

    __slots__ = ("synced",)

    def __init__(self):
        host = np.zeros(4, np.uint64)
        super().__init__(host, host.ctypes.data, self._sync)
        self.synced = 0

    def _sync(self):
        self.synced += 1


@pytest.fixture
def ring():
    _flags.queue.clear()
    yield Ring()
    _flags.queue.clear()


def publish(ring, address, seq, bits):
    """What the kernel does: one 64-bit store of (seq << 24) | (channel + 1) << 2 | bits (no channel)."""
    ring.host[(address - ring.address) // 8] = np.uint64((seq << 24) | bits)


def test_host_flags_are_reported_at_once():
    seen = []
    _flags.watch(np.array([2.0, 0.0], np.float32), seen.append)
    assert seen == [2]


def test_a_slot_is_reported_by_a_later_poll_once_its_sequence_lands(ring):
    seen = []
    a, seq_a = _flags.claim(ring, lambda bits: seen.append(("a", bits)))
    b, seq_b = _flags.claim(ring, lambda bits: seen.append(("b", bits)))
    assert a != b and seq_b == seq_a + 1
    _flags.poll()
    assert seen == [] and ring.synced == 0               # nothing written yet, nothing waited for
    ring.host[(a - ring.address) // 8] = np.uint64(((seq_a - 1) << 24) | 3)  # an older pass's value
    _flags.poll()
    assert seen == []                                    # not this pass's sequence: not final
    publish(ring, b, seq_b, 2)
    _flags.poll()
    assert seen == []                                    # reported in order: a comes first
    publish(ring, a, seq_a, 1)
    _flags.poll()
    assert seen == [("a", 1), ("b", 2)] and not _flags.pending()
    assert ring.busy == 0


def test_flush_synchronizes_then_reports_and_drops_what_never_ran(ring):
    seen = []
    a, seq_a = _flags.claim(ring, seen.append)
    _, _ = _flags.claim(ring, lambda bits: seen.append(("never", bits)))   # e.g. its kernel was captured
    publish(ring, a, seq_a, 2)
    _flags.flush()
    assert ring.synced == 1 and seen == [2] and not _flags.pending() and ring.busy == 0


def test_a_full_ring_waits_for_the_device_before_reusing_a_slot(ring):
    seen = []
    claimed = [_flags.claim(ring, seen.append) for _ in range(ring.size)]
    assert ring.synced == 0 and len({address for address, _ in claimed}) == ring.size
    for address, seq in claimed[1:]:
        publish(ring, address, seq, 2)                    # the first pass never ran (captured)
    _flags.claim(ring, seen.append)                      # the ring is full: synchronize, free the slots
    assert ring.synced == 1 and seen == [] and ring.busy == 1          # nothing reported mid-pass
    _flags.poll()
    assert seen == [2] * (ring.size - 1)                 # what landed, in order, by the next poll


def test_landed_reports_survive_a_full_ring_behind_another_rings_pending_pass(ring):
    """One process driving two GPUs: ring B's unwritten pass heads the queue when ring A fills."""
    other = Ring()
    seen = []
    _flags.claim(other, lambda bits: seen.append(("b", bits)))
    for _ in range(ring.size):
        address, seq = _flags.claim(ring, lambda bits: seen.append(("a", bits)))
        publish(ring, address, seq, 2)
    _flags.claim(ring, lambda bits: seen.append(("a", bits)))
    assert seen == []
    _flags.flush()
    assert seen == [("a", 2)] * ring.size                # B's pass never ran; none of A's is lost


def test_a_report_that_raises_surfaces_in_the_polling_call(ring):
    def report(bits):
        raise RuntimeError("out of step")
    address, seq = _flags.claim(ring, report)
    publish(ring, address, seq, 2)
    with pytest.raises(RuntimeError, match="out of step"):
        _flags.poll()
    assert not _flags.pending()                          # reported once
