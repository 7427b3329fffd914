"""The CUDA kernels and the CuPy backend's launch logic, run on the CPU by tests/cuda_emu.

The GPU backend's code path is the real one (``CupyBackend``: grids, splits, vector
widths, workspaces, argument types), only CuPy's arrays and launches are replaced.
The same layer checks as tests/test_gpu.py, plus: every instantiation is executed,
and negative controls showing the emulator does catch what would break on a GPU.
"""
import numpy as np
import pytest

import cuda_emu
import cusyncbn
from cusyncbn import _kernels, _tuning
from cusyncbn._rules import channel_last, shape3
from layer_check import SHAPES, TOL, check_layer

# Emulated threads are slow: the widest shape is narrowed (same layout and parities).
EMU_SHAPES = [(f, (8, 258, 2, 2) if s == (64, 2048, 2, 2) else s) for f, s in SHAPES]


def bf16():
    return pytest.importorskip("ml_dtypes").bfloat16


def to_device(a, dtype, misalign=False):
    dt = bf16() if dtype == "bfloat16" else np.dtype(dtype)
    return cuda_emu.guarded_copy(np.asarray(a).astype(dt), misalign=misalign)


def to_host(a):
    return np.asarray(a).astype(np.float64)


@pytest.fixture
def emu(use_backend):
    """Layers created on "cpu" get the emulated GPU backend for the duration of the test."""
    return use_backend(cuda_emu.EmuBackend(sms=4))


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("data_format,shape", EMU_SHAPES)
def test_emulated_kernels_match_reference(emu, data_format, shape, dtype):
    check_layer(data_format, shape, dtype, to_device, to_host, device="cpu")
    assert emu.launches, "the emulated backend was not used"


@pytest.mark.parametrize("sms", [1, 132])
def test_emulated_grid_sizes(use_backend, sms):
    """One block per channel (sms=1, channel-second), and an H100-sized grid splitting every
    channel many ways, so the last-block merge runs; its tickets are back to zero after every
    launch."""
    backend = use_backend(cuda_emu.EmuBackend(sms=sms))
    for fmt, shape in (("NCHW", (16, 3, 40, 41)), ("NHWC", (16, 20, 41, 8)), ("NC", (3001, 5))):
        check_layer(fmt, shape, "float32", to_device, to_host, device="cpu", seed=sms)
    splits = {"cs": [], "cl": []}          # grids: channel-second (splits, C), channel-last (tiles, splits)
    for expr, grid in backend.grids:
        if expr.startswith(("moments_c", "backward_c")):
            layout = expr.split("<")[0][-2:]
            splits[layout].append(grid[0] if layout == "cs" else grid[1])
    if sms == 132:
        assert min(max(splits["cs"]), max(splits["cl"])) > 4
    else:
        assert max(splits["cs"]) == 1 and max(splits["cl"]) > 1
    tickets = [v for k, v in backend._scratch.items() if k[0] == "tickets"]
    assert tickets and all(not t.any() for t in tickets)


@pytest.mark.parametrize("sms", [1, 132])
def test_more_channels_than_grid_rows(use_backend, sms):
    """Channel-second slab kernels loop over the channels beyond grid.y (65535 on a GPU, 2 here);
    the rows are long enough for slabs (``_tuning.layout_for``)."""
    backend = use_backend(cuda_emu.EmuBackend(sms=sms))
    backend.max_grid_y = 2
    check_layer("NCHW", (6, 5, 16, 16), "float32", to_device, to_host, device="cpu")
    check_layer("NCL", (4, 7, 65), "float16", to_device, to_host, device="cpu")
    assert {g[1] for e, g in backend.grids if e.startswith(("moments_cs", "backward_cs"))} == {2}


def test_results_do_not_depend_on_block_order(use_backend):
    """The last block to finish merges the splits in index order: bitwise the same results
    whichever block arrives last (blocks run in index order, then in two shuffled orders)."""
    results = []
    for order in (0, 1, 2024):
        use_backend(cuda_emu.EmuBackend(sms=132, block_order=order))
        run = []
        for fmt, shape in (("NCHW", (16, 3, 40, 41)), ("NHWC", (16, 20, 41, 8))):
            x = to_device(np.random.default_rng(0).normal(size=shape), "float32")
            dy = to_device(np.random.default_rng(1).normal(size=shape), "float32")
            bn = cusyncbn.SyncBatchNorm(shape[-1] if fmt == "NHWC" else shape[1], data_format=fmt)
            run += [bn(x).copy(), bn.backward(dy).copy(), bn.weight.grad.copy(), bn._variance.copy()]
        results.append(run)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_every_instantiation_runs(emu):
    """Slabs and row tiles with runs of 8, 4 and 2 elements (odd counts around them, so that the
    widest vector dividing the extent is that run: channel-second rows of 257 k, long enough
    for slabs; channel-last rows of k channels), aligned and misaligned, every dtype and
    parameter dtype: together they launch every kernel the CuPy backend can launch."""
    shapes = [(fmt, shape) for k in (8, 4, 2) for fmt, shape in (("NCHW", (1, 3, 1, 257 * k)),
                                                                 ("NHWC", (3, 1, 1, k)))]
    for dtype in TOL:
        for pdtype in ("float32", "float64"):
            for fmt, shape in shapes:
                for misalign in (False, True):
                    def dev(a, dt, misalign=misalign, dtype=dtype):
                        return to_device(a, dt, misalign and dt == dtype)
                    check_layer(fmt, shape, dtype, dev, to_host, device="cpu", param_dtype=pdtype)
    every = {e for d in TOL for e in _kernels.name_expressions(d).values()}
    assert every - set(emu.launches) == set()


def test_misaligned_input_takes_the_scalar_path(emu):
    x = to_device(np.random.default_rng(0).normal(size=(4, 8, 16, 16)), "float32", misalign=True)
    bn = cusyncbn.SyncBatchNorm(8)
    bn(x)
    assert "normalize_cs<float, float, 1>" in emu.launches and "normalize_cs<float, float, 4>" not in emu.launches
    bn(to_device(np.asarray(x), "float32"))                     # aligned again: a plan of its own
    assert "normalize_cs<float, float, 4>" in emu.launches


def test_vector_widths_follow_the_rows(emu):
    """A slab's vectors stay inside a channel's run (runs of 385: scalar slabs); a row tile's stay
    inside a row: rows of 4 channels x 3 values take 4-wide vectors that cross from one channel's
    run into the next's, rows of 6 channel-last channels 2-wide ones."""
    check_layer("NCHW", (2, 3, 1, 385), "float16", to_device, to_host, device="cpu")
    check_layer("NCHW", (8, 4, 1, 3), "float16", to_device, to_host, device="cpu")
    check_layer("NHWC", (4, 3, 5, 6), "float32", to_device, to_host, device="cpu")
    for expr in ("moments_cs<half_t, 1>", "normalize_cs<half_t, float, 1>", "dx_cs<half_t, 1>",
                 "moments_cl<half_t, 4>", "normalize_cl<half_t, float, 4>", "dx_cl<half_t, 4>",
                 "moments_cl<float, 2>", "normalize_cl<float, float, 2>", "dx_cl<float, 2>"):
        assert expr in emu.launches


# ---- negative controls: the emulator reports what would fail on a GPU ---------------------

def _dx_args(dy, x, dx, stats, shape3):
    """Arguments of dx_cs with fixed statistics (dx = dy * scale)."""
    a, c, b = shape3
    return (dy, x, dx, np.int32(a), np.int32(c), np.int32(b), stats, None, None, np.float64(0), np.float64(1), None,
            np.uint64(0), None, None)


def test_rejects_wrong_argument_types():
    k = cuda_emu.library().kernel("dx_cs<float, 1>")
    dy, x, dx = np.ones((2, 3, 5), np.float32), np.ones((2, 3, 5), np.float32), np.zeros((2, 3, 5), np.float32)
    stats = np.full(14, 2.0, np.float32)
    args = _dx_args(dy, x, dx, stats, (2, 3, 5))
    k((1, 3), (32,), args)                                                    # the right types run
    np.testing.assert_array_equal(dx, 2.0)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="scalar kind"):
        k((1, 3), (32,), args[:3] + (np.int64(2),) + args[4:])
    with pytest.raises(cuda_emu.EmulatedKernelError, match="scalar kind"):
        k((1, 3), (32,), args[:-6] + (np.float32(0),) + args[-5:])
    with pytest.raises(cuda_emu.EmulatedKernelError, match="points to"):
        k((1, 3), (32,), (dy.astype(np.float64),) + args[1:])
    with pytest.raises(cuda_emu.EmulatedKernelError, match="takes 15 arguments"):
        k((1, 3), (32,), args[:-1])


def test_catches_misaligned_vector_access_and_bad_launches():
    backend = cuda_emu.EmuBackend()
    x = to_device(np.ones((2, 3, 8)), "float32", misalign=True)
    dx = backend.empty(x.shape, np.float32)
    stats = backend.zeros((14,), np.float32)
    k = backend._kernel("float32", "dx_cs4", 4)
    args = _dx_args(x, x, dx, stats, x.shape)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="misaligned 16-byte"):
        k((1, 3), (256,), args)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="invalid grid"):
        k((1, 70000), (256,), args)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="invalid block"):
        k((1,), (2048,), args)
    moments = backend._kernel("float32", "moments_cs1", 4)
    part, ticket = backend.zeros((12,), np.float64), backend.zeros((3,), np.uint32)
    pivot, buf = backend.zeros((3,), np.float64), backend.zeros((9,), np.float64)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="partial warp"):
        moments((1, 3), (48,), (x, np.int32(2), np.int32(3), np.int32(8), None, None, np.float64(0), part, ticket,
                                pivot, buf), shared_mem=8 * 64)


def test_catches_writes_outside_an_allocation():
    backend = cuda_emu.EmuBackend()
    x = to_device(np.ones((2, 3, 8)), "float32")
    dx_short = backend.empty((x.size - 1,), np.float32)
    stats = backend.zeros((14,), np.float32)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="wrote outside"):
        backend._kernel("float32", "dx_cs1", 4)((1, 3), (256,), _dx_args(x, x, dx_short, stats, x.shape))


def test_catches_divergent_barrier():
    source = ("template <int N> __global__ void divergent(int* out) {\n"
              "    if ((int)threadIdx.x < N) __syncthreads();\n"
              "    out[threadIdx.x] = 1;\n"
              "}\n")
    lib = cuda_emu.Library(source, ["divergent<16>", "divergent<64>"])
    out = np.zeros(64, np.int32)
    lib.kernel("divergent<64>")((1,), (64,), (out,))                     # every thread reaches it
    assert out.sum() == 64
    with pytest.raises(cuda_emu.EmulatedKernelError, match="deadlock"):
        lib.kernel("divergent<16>")((1,), (64,), (out,))


MUTATIONS = {
    "M2 without the s1^2/n term": ("double m2 = s2 - s1 * d1;", "double m2 = s2;"),
    "last-block ticket never reset": ("__threadfence(); *ticket = 0;", "__threadfence();"),
    "dx without the mean-of-dy term": ("cf[1] = (S)(buf[c] / n);", "cf[1] = 0;"),
    "split partials summed from one split only": ("for (int q = j; q < splits; q += J)", "for (int q = j; q < 1; q += J)"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_bug_in_the_kernels_fails_the_layer_check(use_backend, mutation):
    """syncbn.cu with one deliberate bug: the layer checks must fail (two training steps,
    on a grid that splits channels, so the tickets are reused)."""
    use_backend(cuda_emu.EmuBackend(sms=132, kernels=cuda_emu.mutated(*MUTATIONS[mutation])))
    # Wrong numbers fail the comparison; a corrupted payload may also be caught first by the
    # layer's own collective-tag check (RuntimeError).
    with pytest.raises((AssertionError, RuntimeError)):
        for seed in (0, 1):
            check_layer("NCHW", (16, 3, 40, 41), "float32", to_device, to_host, device="cpu", seed=seed)


def test_training_step_allocates_only_its_outputs(emu):
    """Statistics, payloads, workspaces and coefficients are reused across calls."""
    rng = np.random.default_rng(0)
    x = to_device(rng.normal(size=(4, 8, 5, 5)), "float32")
    dy = to_device(rng.normal(size=(4, 8, 5, 5)), "float32")
    bn = cusyncbn.SyncBatchNorm(8)
    y0, dx0 = bn(x).copy(), bn.backward(dy).copy()          # warm-up: the pools fill
    shapes = []
    allocate = emu.empty
    emu.empty = emu.allocate = lambda shape, dtype: shapes.append(tuple(np.atleast_1d(shape))) or allocate(shape, dtype)
    bn.weight.grad[...] = 0
    bn.bias.grad[...] = 0
    y, dx = bn(x), bn.backward(dy)
    assert shapes == [(4, 8, 5, 5), (4, 8, 5, 5)]            # y and dx, nothing else
    np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx0, rtol=1e-6, atol=1e-6)
    with cusyncbn.no_grad():
        bn(x)
    assert len(shapes) == 3                                   # y
    bn.eval()
    with cusyncbn.no_grad():
        bn(x)                                                 # a new signature: its first call warms up
        del shapes[:]
        bn(x)
    assert shapes == [(4, 8, 5, 5)]                           # y, nothing else


# ---- launches per pass, flags ------------------------------------------------------------------

def _launches_of(emu, step):
    before = len(emu.grids)
    step()
    return [expr if expr.startswith("<") else expr.split("<")[0] for expr, _ in emu.grids[before:]]


@pytest.mark.parametrize("data_format,shape", [("NCHW", (4, 8, 5, 5)), ("NHWC", (4, 5, 5, 8)), ("NC", (16, 8)),
                                               ("NCHW", (0, 8, 5, 5)), ("NHWC", (0, 5, 5, 8))])
def test_launches_per_pass(emu, data_format, shape):
    """Training forward: moments + normalize; backward: backward sums + dx; eval forward:
    normalize. Nothing else reaches the device (a fill or item assignment on a device array
    counts as a launch, as it is one on a GPU), also for an empty batch."""
    c = shape[-1] if data_format == "NHWC" else shape[1]
    bn = cusyncbn.SyncBatchNorm(c, data_format=data_format)
    x = to_device(np.random.default_rng(0).normal(size=shape), "float32")
    for _ in range(2):                                  # the first call builds the plans
        y = bn(x)
        bn.backward(y)
    last = channel_last(data_format)
    layout = _tuning.layout_for(shape3(shape, c, last), "float32")       # NCHW (4, 8, 5, 5): row tiles
    assert _launches_of(emu, lambda: bn(x)) == [f"moments_{layout}", f"normalize_{layout}"]
    assert _launches_of(emu, lambda: bn.backward(x)) == [f"backward_{layout}", f"dx_{layout}"]
    bn.eval()
    assert _launches_of(emu, lambda: bn(x)) == [f"normalize_{layout}"]
    with cusyncbn.no_grad():
        assert _launches_of(emu, lambda: bn(x)) == [f"normalize_{layout}"]


def test_a_host_fill_counts_as_a_launch(emu):
    """The launch count above would see a stray fill (the old backend's tag and flag fills)."""
    a = emu.zeros((4,), np.float64)
    assert _launches_of(emu, lambda: a.fill(1)) == ["<host fill>"]
    assert _launches_of(emu, lambda: a.__setitem__(slice(0, 2), 3)) == ["<host setitem>"]


def _forward_step(backend, x, running, tag, ranks, tamper=None, momentum=0.9):
    """One training forward through ``backend`` directly: (stats array, payload, running stats)."""
    from cusyncbn._backend import ForwardPayload, Stats
    c = x.shape[1]
    rm, rv = (backend.zeros((c,), np.float32), backend.zeros((c,), np.float32))
    np.copyto(rm, running[0])
    np.copyto(rv, running[1])
    stats = Stats(backend.empty((Stats.size(c),), np.float32), backend.empty((ForwardPayload.size(c),), np.float64), c)
    pivot_state = backend.zeros((c,), np.float64)
    np.copyto(pivot_state, running[0])                # here the running mean's values
    backend.local_moments(x3=x, pivot_state=pivot_state, tag=tag, buf=stats.payload)
    if tamper is not None:
        tamper(stats.payload)
    y = backend.empty(x.shape, x.dtype)
    backend.normalize_batch(x3=x, buf=stats.payload, tag=tag, ranks=ranks, running_mean=rm, running_var=rv,
                            momentum=momentum, eps=1e-5, unbiased=False, weight=None, bias=None, stats=stats, y3=y)
    return np.array(stats.data, np.float64), np.array(stats.payload), np.array(rm), np.array(rv), np.array(y)


@pytest.mark.parametrize("shape", [(6, 3, 10), (40, 3, 1)])
@pytest.mark.parametrize("case", ["plain", "nonfinite", "desync", "empty_rank"])
def test_flags_and_running_statistics_match_numpy(emu, shape, case):
    """flags[0] (non-finite channel, disagreeing tags), the running statistics left alone per
    non-finite channel or entirely on a desync, and a rank without samples among others:
    bitwise-comparable to the NumPy backend's decisions."""
    from cusyncbn._backend import ForwardPayload
    from cusyncbn._backend_numpy import NumpyBackend
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
    if case == "nonfinite":
        x[1, 1, 0] = np.nan
    running = (rng.normal(size=3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32))
    tamper, ranks = None, 1
    if case == "desync":
        tamper = lambda buf: np.copyto(ForwardPayload(buf, 3).tags, (6.0, 20.0))     # another rank sent tag 2
        ranks = 2
    if case == "empty_rank":                         # this rank has no rows; the others' sums arrive
        other = NumpyBackend()
        full = _forward_step(other, x, running, 4, 1)[1]
        x = x[:0]
        tamper = lambda buf: np.copyto(buf, full)
    ours = _forward_step(emu, cuda_emu.guarded_copy(x), running, 4, ranks, tamper)
    ref = _forward_step(NumpyBackend(), x, running, 4, ranks, tamper)
    c = shape[1]
    flags = {"plain": 0, "nonfinite": 1, "desync": 2, "empty_rank": 0}[case]
    assert ours[0][4 * c] == ref[0][4 * c] == flags                                # flags[0]
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-6, atol=1e-6)             # payload (tags included)
    np.testing.assert_allclose(ours[2:4], ref[2:4], rtol=1e-6, atol=1e-7)         # running statistics
    np.testing.assert_allclose(ours[0][:4 * c], ref[0][:4 * c], rtol=1e-5, atol=1e-6)
    if case == "desync":
        np.testing.assert_array_equal(ours[2], running[0])


def test_backward_flag_reports_disagreeing_tags(emu):
    from cusyncbn._backend import BackwardPayload, ForwardPayload, Stats
    rng = np.random.default_rng(6)
    x = cuda_emu.guarded_copy(rng.normal(size=(5, 3, 8)).astype(np.float32))
    stats = Stats(emu.zeros((Stats.size(3),), np.float32), emu.zeros((ForwardPayload.size(3),), np.float64), 3)
    np.copyto(stats.data[:12], np.tile([0.5, 1.0, 1.0], 4)[:12])
    count = emu.zeros((1,), np.float64)
    np.copyto(count, 40.0)
    flags = []
    for sums in ((3.0, 9.0), (4.0, 10.0)):                     # tag 3 on one rank: agree; then not
        buf = emu.zeros((BackwardPayload.size(3),), np.float64)
        emu.backward_reduce(dy3=x, x3=x, stats=stats, weight_grad=None, bias_grad=None, tag=3, buf=buf)
        np.copyto(BackwardPayload(buf, 3).tags, sums)
        dx = emu.empty(x.shape, np.float32)
        emu.backward_input(dy3=x, x3=x, stats=stats, buf=buf, count=count, tag=3, ranks=1, dx3=dx)
        flags.append(float(stats.flags[1]))
    assert flags == [0.0, 2.0]
