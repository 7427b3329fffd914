"""The all-reduce payload layouts (``_backend.ForwardPayload`` / ``BackwardPayload``): written
once in Python, indexed by slot name there, and the same slots the kernels write."""
import numpy as np
import pytest

import cuda_emu
from cusyncbn._backend import BackwardPayload, ForwardPayload, Stats
from cusyncbn._backend_numpy import NumpyBackend


@pytest.mark.parametrize("layout,names", [(ForwardPayload, ("sum_x", "m2_pivot", "count", "tags")),
                                          (BackwardPayload, ("sum_dy", "sum_dy_xmu", "tags"))])
@pytest.mark.parametrize("channels", [1, 2, 7])
def test_the_slots_tile_the_payload(layout, names, channels):
    """Every value of the buffer is in exactly one slot, in the documented order."""
    buf = np.arange(layout.size(channels), dtype=np.float64)
    slots = layout(buf, channels)
    assert slots.buf is buf
    joined = np.concatenate([getattr(slots, name) for name in names])
    np.testing.assert_array_equal(joined, buf)
    for name in names:
        assert np.shares_memory(getattr(slots, name), buf), f"{name} is a copy, not a view"


def test_a_length_names_its_payload():
    for c in (1, 2, 64, 2048):
        assert ForwardPayload.channels_of(ForwardPayload.size(c)) == c
        assert BackwardPayload.channels_of(BackwardPayload.size(c)) == c
        assert BackwardPayload.channels_of(ForwardPayload.size(c)) is None        # odd: a forward's
        assert ForwardPayload.channels_of(BackwardPayload.size(c)) is None        # even: a backward's
    for size in (0, 1, 2, 3):
        assert ForwardPayload.channels_of(size) is None and BackwardPayload.channels_of(size) is None


def test_stats_carry_their_payload_slots():
    data, payload = np.zeros(Stats.size(3), np.float32), np.zeros(ForwardPayload.size(3), np.float64)
    stats = Stats(data, payload, 3)
    assert stats.payload is payload and stats.slots.buf is payload
    stats.slots.count[0] = 12
    assert payload[6] == 12
    assert [len(a) for a in (stats.mean, stats.invstd, stats.scale, stats.offset, stats.flags)] == [3, 3, 3, 3, 2]


@pytest.mark.parametrize("shape", [(5, 3, 8), (40, 3, 1)])
@pytest.mark.parametrize("backend", ["numpy", "kernels"])
def test_the_backends_write_the_slots_the_layout_names(shape, backend):
    """What each slot must hold, from the input itself: the NumPy backend and the emulated
    kernels (whose ``buf`` offsets are written in CUDA) fill the slots the Python layout names."""
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 2.0, size=shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    c, n, tag = shape[1], shape[0] * shape[2], 6
    be = NumpyBackend() if backend == "numpy" else cuda_emu.EmuBackend(sms=2)
    dev = (lambda a: a) if backend == "numpy" else cuda_emu.guarded_copy
    x3, dy3 = dev(x), dev(dy)
    pivot_state = dev(np.full(c, 4.0))
    buf = be.zeros((ForwardPayload.size(c),), np.float64)
    be.local_moments(x3=x3, pivot_state=pivot_state, tag=tag, buf=buf)
    forward = ForwardPayload(np.asarray(buf), c)
    x64 = x.astype(np.float64)
    assert forward.count[0] == n
    np.testing.assert_array_equal(forward.tags, (tag, tag * tag))
    np.testing.assert_allclose(forward.sum_x, x64.sum(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(forward.m2_pivot, ((x64 - 4.0) ** 2).sum(axis=(0, 2)), rtol=1e-5)

    stats = Stats(be.zeros((Stats.size(c),), np.float32), be.zeros((ForwardPayload.size(c),), np.float64), c)
    mean = x64.mean(axis=(0, 2))
    np.copyto(stats.mean, mean.astype(np.float32))
    np.copyto(stats.invstd, 1.0)
    bbuf = be.zeros((BackwardPayload.size(c),), np.float64)
    be.backward_reduce(dy3=dy3, x3=x3, stats=stats, weight_grad=None, bias_grad=None, tag=tag, buf=bbuf)
    backward = BackwardPayload(np.asarray(bbuf), c)
    np.testing.assert_array_equal(backward.tags, (tag, tag * tag))
    np.testing.assert_allclose(backward.sum_dy, dy.astype(np.float64).sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)
    xmu = x64 - mean.astype(np.float32).astype(np.float64)[None, :, None]
    np.testing.assert_allclose(backward.sum_dy_xmu, (dy * xmu).sum(axis=(0, 2)), rtol=1e-4, atol=1e-4)
