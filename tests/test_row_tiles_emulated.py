"""Row tiles and the traversal order of the second kernels, run on the CPU by tests/cuda_emu.

Channel-second input with short rows (H*W small, odd, or not a multiple of the vector width)
runs the row-tile kernels (``*_cl``): a row of C * B values is tiled across the channels, a
vector may cross from one channel's run into the next's, and a channel spanning two tiles is
finished by the last of them (``channel_totals``). The elementwise passes (normalize, dx) walk
their reduction's grid backward: mirrored blocks, each thread's vectors last first
(docs/KERNELS.md, "Traversal order"). Every check here runs against the float64 reference
with the emulator's guard zones and NaN-filled outputs (an element a kernel forgets, or one
written twice out of bounds, fails).
"""
import ctypes

import numpy as np
import pytest

import cuda_emu
import cusyncbn
from cusyncbn import _kernels, _tuning
from cusyncbn._rules import shape3
from cusyncbn._tuning import LaunchConfig
from layer_check import TOL, check_layer
from test_kernels_emulated import to_device, to_host


def _shape(layout, c, hw, n=4):
    h, w = {1: (1, 1), 3: (1, 3), 7: (7, 1), 49: (7, 7)}[hw]
    return (n, c, h, w) if layout == "NCHW" else (n, h, w, c)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("hw", [1, 3, 7, 49])
@pytest.mark.parametrize("c", [1, 5, 33])
def test_short_rows_match_the_reference(use_backend, dtype, layout, hw, c):
    """H*W in {1, 3, 7, 49} x C in {1, 5, 33}, both layouts, every dtype: training forward and
    backward, eval forward and backward, gradients and running statistics against the float64
    reference. Channel-second input of these sizes runs row tiles (a batch of 4: every channel
    has fewer vectors than a slab block has threads)."""
    backend = use_backend(cuda_emu.EmuBackend(sms=4))
    shape = _shape(layout, c, hw)
    check_layer(layout, shape, dtype, to_device, to_host, device="cpu")
    assert {e.split("<")[0] for e in backend.launches} == {"moments_cl", "normalize_cl", "backward_cl", "dx_cl"}


def _row_tile_plans(backend):
    """(kind, B, tile width in columns, splits) of every row-tile plan with B > 1."""
    return [(p.kind, p.fixed["B"], p.block[0] * p.vec, p.grid[1]) for p in backend._plans.values()
            if "_cl<" in p.kernel.expr and p.fixed["B"] > 1]


CASES = [("NCHW", (16, 4, 7, 7), "float32"), ("NCHW", (64, 6, 7, 7), "float32"), ("NCHW", (9, 5, 1, 3), "float16"),
         ("NCHW", (40, 2, 3, 7), "bfloat16"), ("NCHW", (3, 33, 7, 7), "float64"), ("NCL", (128, 3, 12), "float32"),
         ("NCHW", (1024, 12, 1, 6), "float32"), ("NCHW", (512, 6, 3, 3), "bfloat16")]


@pytest.mark.parametrize("sms", [4, 132])
@pytest.mark.parametrize("order", [0, 7])
def test_channels_spanning_tiles_and_splits(use_backend, sms, order):
    """Channels whose runs cross tile boundaries (a tile narrower than a run, or not a multiple of
    it) and rows split over several blocks, on a small and an H100-sized grid, blocks in index
    order and shuffled: the channel totals (two-level: split partials per tile, then edge shares
    per channel) match the reference, and every ticket is back to zero."""
    backend = use_backend(cuda_emu.EmuBackend(sms=sms, block_order=order))
    for seed, (fmt, shape, dtype) in enumerate(CASES):
        check_layer(fmt, shape, dtype, to_device, to_host, device="cpu", seed=seed)
    plans = _row_tile_plans(backend)
    assert any(width % b for _, b, width, _ in plans)                  # runs cross tile boundaries
    assert any(b > width for _, b, width, _ in plans)                  # a run longer than a tile
    if sms == 132:
        assert any(splits > 1 for _, _, _, splits in plans)            # split partials, then edge shares
    tickets = [v for k, v in backend._scratch.items() if k[0] == "tickets"]
    assert tickets and all(not t.any() for t in tickets)


def test_misaligned_short_rows_take_narrower_vectors(use_backend):
    """Rows of 4 channels x 7 values take 4-wide float32 vectors aligned, 1-wide one element off."""
    backend = use_backend(cuda_emu.EmuBackend(sms=4))
    for misalign in (False, True):
        def dev(a, dtype, misalign=misalign):
            return to_device(a, dtype, misalign and dtype == "float32")
        check_layer("NCHW", (6, 4, 7, 1), "float32", dev, to_host, device="cpu")
    assert {"moments_cl<float, 4>", "normalize_cl<float, float, 4>", "moments_cl<float, 1>",
            "dx_cl<float, 1>"} <= set(backend.launches)


def test_row_tiles_are_bitwise_reproducible(use_backend):
    """The channel totals of row tiles are summed in a fixed order: the same bits whichever block
    finishes a tile or a channel last."""
    results = []
    for order in (0, 1, 2024):
        use_backend(cuda_emu.EmuBackend(sms=132, block_order=order))
        x = to_device(np.random.default_rng(0).normal(3, 2, size=(64, 6, 7, 7)), "float32")
        dy = to_device(np.random.default_rng(1).normal(size=(64, 6, 7, 7)), "float32")
        bn = cusyncbn.SyncBatchNorm(6)
        results.append([bn(x).copy(), bn.backward(dy).copy(), bn.weight.grad.copy(), bn._variance.copy()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


# ---- the traversal order: a build that records every vector access --------------------------------------

TRACE = r"""
#undef CUSYNCBN_CHECK_ALIGNED
// Every vector load and store: (block, thread, address), in the order the emulator runs them.
static std::vector<unsigned long long> emu_trace;
extern "C" unsigned long long emu_trace_size() { return emu_trace.size(); }
extern "C" const unsigned long long* emu_trace_data() { return emu_trace.data(); }
#define CUSYNCBN_CHECK_ALIGNED(ptr, bytes)                                                            \
    do {                                                                                               \
        emu_trace.push_back(blockIdx.x + (unsigned long long)blockIdx.y * gridDim.x);                  \
        emu_trace.push_back(threadIdx.x + threadIdx.y * blockDim.x);                                   \
        emu_trace.push_back(reinterpret_cast<unsigned long long>(ptr));                                \
    } while (0)
"""
TRACED = ["moments_cs<float, 4>", "normalize_cs<float, float, 4>", "backward_cs<float, float, 4>", "dx_cs<float, 4>",
          "moments_cl<float, 4>", "normalize_cl<float, float, 4>", "backward_cl<float, float, 4>", "dx_cl<float, 4>"]


class Trace:
    """syncbn.cu built with a hook on every vector access (CUSYNCBN_CHECK_ALIGNED)."""

    def __init__(self):
        self.lib = cuda_emu.Library(TRACE + _kernels.source(), TRACED, _kernels.options())
        self._size = self.lib._lib.emu_trace_size
        self._size.restype = ctypes.c_ulonglong
        self._data = self.lib._lib.emu_trace_data
        self._data.restype = ctypes.POINTER(ctypes.c_ulonglong)

    def size(self):
        return int(self._size()) // 3

    def rows(self, start, end):
        """(block, thread, address) rows start .. end - 1."""
        n = self.size()
        return np.ctypeslib.as_array(self._data(), shape=(3 * n,)).reshape(n, 3)[start:end].copy()


def _accesses(rows, lo, hi, skip_first=False):
    """{(block, thread): [addresses in [lo, hi) in the order of their first access]} (a walk's last
    batch loads its first leftover again in its unused slots); ``skip_first``: without each
    thread's first access (channel-last moments: x0, one vector of row 0, before the walk)."""
    out = {}
    for block, thread, address in rows:
        if lo <= address < hi:
            seen = out.setdefault((int(block), int(thread)), {})
            if skip_first and "x0" not in seen:
                seen["x0"] = None
                continue
            seen.setdefault(int(address), None)
    return {key: [a for a in seen if a != "x0"] for key, seen in out.items()}


@pytest.mark.parametrize("fmt,shape,config", [
    ("NCHW", (16, 3, 40, 40), LaunchConfig(threads=64)),             # slabs, 21 splits per channel
    ("NCHW", (512, 8, 1, 6), LaunchConfig(threads=64, lanes=2)),     # row tiles of short rows, 10 splits
    ("NHWC", (400, 1, 3, 16), LaunchConfig(threads=64, lanes=2))])   # row tiles, channel-last, 32 splits
def test_second_kernels_start_where_the_first_ended(use_backend, fmt, shape, config):
    """normalize walks the moments kernel's grid backward, dx the backward sums' grid: block i of
    n takes the vectors block n - 1 - i took, each thread in the reverse order of its twin, so
    the data the first kernel read last is read first. The same grid for both kernels of a
    pass (one launch configuration), every vector access recorded: x (and dy) addresses per
    (block, thread) are the reduction's, reversed. The results are bitwise those of a build
    that walks the elementwise passes forward."""
    trace = Trace()
    backend = use_backend(cuda_emu.EmuBackend(sms=4, kernels=trace.lib, block_order=0))
    c = shape[-1] if fmt == "NHWC" else shape[1]
    layout = _tuning.layout_for(shape3(shape, c, fmt == "NHWC"), "float32")
    for kind in _kernels.PASSES:
        backend.set_launch_config(kind, layout, config)
    ends = []
    check = backend._check_guards
    backend._check_guards = lambda expr, grid: ends.append((expr, grid, trace.size())) or check(expr, grid)
    rng = np.random.default_rng(3)
    x, dy = to_device(rng.normal(size=shape), "float32"), to_device(rng.normal(size=shape), "float32")
    bn = cusyncbn.SyncBatchNorm(c, data_format=fmt)
    start = trace.size()
    y, dx = bn(x), bn.backward(dy)
    launches = {}
    for expr, grid, end in ends:
        if end > start:
            launches[expr.split("<")[0]] = (grid, trace.rows(start, end))
        start = end
    assert set(launches) == {f"{k}_{layout}" for k in _kernels.PASSES}
    arrays = [(x.ctypes.data, x.ctypes.data + x.nbytes), (dy.ctypes.data, dy.ctypes.data + dy.nbytes)]
    for first, second in (("moments", "normalize"), ("backward", "dx")):
        (grid, reads), (grid2, reads2) = launches[f"{first}_{layout}"], launches[f"{second}_{layout}"]
        assert grid == grid2 and grid[0] * grid[1] > 4
        blocks = grid[0] * grid[1]
        for lo, hi in arrays[:1 if first == "moments" else 2]:
            before = _accesses(reads, lo, hi, skip_first=first == "moments" and fmt == "NHWC")
            after = _accesses(reads2, lo, hi)
            assert before and set(after) == {(blocks - 1 - b, t) for b, t in before if before[(b, t)]}
            for (b, t), addresses in before.items():
                assert after.get((blocks - 1 - b, t), []) == addresses[::-1], (first, b, t)
        # the first vector the second kernel reads is one the first kernel's last block read
        last = int(reads[-1][0])
        assert int(reads2[0][2]) in {int(a) for b, _, a in reads if b == last}
    walked_forward = _kernels.source().replace("FORWARD = false, BACKWARD = true", "FORWARD = false, BACKWARD = false")
    forward = cuda_emu.Library(walked_forward, TRACED, _kernels.options())
    backend = use_backend(cuda_emu.EmuBackend(sms=4, kernels=forward, block_order=0))
    for kind in _kernels.PASSES:
        backend.set_launch_config(kind, layout, config)
    bn = cusyncbn.SyncBatchNorm(c, data_format=fmt)
    np.testing.assert_array_equal(bn(x), y)
    np.testing.assert_array_equal(bn.backward(dy), dx)


ROW_TILE_MUTATIONS = {
    "a channel spanning tiles summed from its first tile only": (
        "for (int t = first; t <= last; ++t) {", "for (int t = first; t <= first; ++t) {", ("NCHW", (16, 4, 7, 7))),
    "the backward slab walk one vector short": (
        "count = count_below(first, (i64)A * B, stride);",
        "count = count_below(first, (i64)A * B, stride) - (int)DIR;", ("NCHW", (16, 3, 40, 41))),
    "the backward row walk one row short": (
        "        at += (i64)(count - 1) * step;\n        step = -step;",
        "        at += (i64)(count - 1) * step;\n        step = -step;\n        count -= 1;", ("NHWC", (16, 9, 5, 8))),
}


@pytest.mark.parametrize("mutation", list(ROW_TILE_MUTATIONS))
def test_a_bug_in_row_tiles_or_the_backward_walks_fails(use_backend, mutation):
    """Negative controls: a channel total missing a tile's share, or an elementwise pass that
    leaves vectors unwritten (the emulator's NaN-filled outputs), fail the layer check."""
    good, bad, (fmt, shape) = ROW_TILE_MUTATIONS[mutation]
    use_backend(cuda_emu.EmuBackend(sms=132, kernels=cuda_emu.mutated(good, bad)))
    with pytest.raises((AssertionError, RuntimeError)):
        check_layer(fmt, shape, "float32", to_device, to_host, device="cpu")
