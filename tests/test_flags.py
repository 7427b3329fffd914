"""Deferred reporting of pass flags on the GPU path (cusyncbn._flags), with a stand-in CuPy."""
import sys
import types

import numpy as np
import pytest

from cusyncbn import _flags


class FakeEvent:
    made = 0

    def __init__(self, block=False, disable_timing=True):
        FakeEvent.made += 1
        self.done = False

    def record(self, stream):
        stream.events.append(self)

    def synchronize(self):
        self.done = True


class FakeStream:
    def __init__(self):
        self.capturing = False
        self.events = []

    def is_capturing(self):
        return self.capturing


class FakeDeviceArray:
    """Just what _flags touches of a CuPy array."""

    def __init__(self, values):
        self.values = np.asarray(values, np.float32)
        self.dtype = self.values.dtype
        self.device = _Ctx()
        self.device.id = 0

    def get(self, stream, out, blocking):
        assert blocking is False                          # an asynchronous copy, never a sync
        out[...] = self.values


class _Ctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.fixture
def fake_cupy(monkeypatch):
    stream = FakeStream()
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(get_current_stream=lambda *a: stream, Event=FakeEvent)
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype: np.empty(shape, dtype)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setattr(_flags, "_pending", type(_flags._pending)())
    monkeypatch.setattr(_flags, "_spare", {})
    return stream


def test_host_flags_are_reported_at_once():
    seen = []
    _flags.watch(np.array([2.0, 0.0], np.float32), lambda f: seen.append(f[0]))
    assert seen == [2.0]


def test_device_flags_are_reported_by_a_later_call_without_waiting(fake_cupy):
    seen = []
    _flags.watch(FakeDeviceArray([1.0, 0.0]), lambda f: seen.append(float(f[0])))
    _flags.watch(FakeDeviceArray([3.0, 0.0]), lambda f: seen.append(float(f[0])))
    _flags.poll()
    assert seen == []                                     # copies still in flight: nothing waited for
    fake_cupy.events[0].done = True
    _flags.poll()
    assert seen == [1.0]                                  # in order, only what has landed
    _flags.flush()
    assert seen == [1.0, 3.0] and not _flags._pending
    made = FakeEvent.made
    _flags.watch(FakeDeviceArray([0.0, 0.0]), seen.append)
    assert FakeEvent.made == made                          # a landed copy's event and buffer are reused


def test_nothing_is_queued_or_queried_while_capturing(fake_cupy):
    seen = []
    fake_cupy.capturing = True
    _flags.watch(FakeDeviceArray([1.0, 0.0]), seen.append)
    assert not _flags._pending and fake_cupy.events == []
    fake_cupy.capturing = False
    _flags.watch(FakeDeviceArray([1.0, 0.0]), lambda f: seen.append(1))
    fake_cupy.events[0].done = True
    fake_cupy.capturing = True
    _flags.poll()                                          # an event query is illegal during capture
    assert seen == []
    fake_cupy.capturing = False
    _flags.poll()
    assert seen == [1]


def test_a_report_that_raises_surfaces_in_the_polling_call(fake_cupy):
    def report(flags):
        raise RuntimeError("out of step")
    _flags.watch(FakeDeviceArray([2.0, 0.0]), report)
    fake_cupy.events[0].done = True
    with pytest.raises(RuntimeError, match="out of step"):
        _flags.poll()
    assert not _flags._pending                             # reported once
