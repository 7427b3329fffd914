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
from cusyncbn import _backend, _kernels
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
def emu(monkeypatch):
    """Layers created on "cpu" get the emulated GPU backend for the duration of the test."""
    backend = cuda_emu.EmuBackend(sms=4)
    monkeypatch.setitem(_backend._backends, "cpu", backend)
    return backend


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("data_format,shape", EMU_SHAPES)
def test_emulated_kernels_match_reference(emu, data_format, shape, dtype):
    check_layer(data_format, shape, dtype, to_device, to_host, device="cpu")
    assert emu.launches, "the emulated backend was not used"


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_packed_launch_matches_cupy_style_launch(monkeypatch, dtype):
    """The opt-in packed launch (cusyncbn._launch, CUSYNCBN_PACKED_LAUNCH=1): the emulator
    reads every kernel's arguments from the packed slots; the results are bitwise those of
    the ordinary launch."""
    outputs = []
    for packed in (False, True):
        backend = cuda_emu.EmuBackend(sms=132, packed=packed)
        monkeypatch.setitem(_backend._backends, "cpu", backend)
        run = []
        for fmt, shape in (("NCHW", (16, 3, 40, 41)), ("NHWC", (16, 20, 41, 8)), ("NC", (301, 5))):
            check_layer(fmt, shape, dtype, to_device, to_host, device="cpu")
            c = shape[-1] if fmt != "NCHW" else shape[1]
            bn = cusyncbn.SyncBatchNorm(c, data_format=fmt, dtype="float64" if dtype == "float64" else "float32")
            x = to_device(np.random.default_rng(0).normal(size=shape), dtype)
            run += [bn(x).copy(), bn.backward(x).copy(), bn.weight.grad.copy(), bn._variance.copy()]
            bn.eval()
            run += [bn(x).copy(), bn.backward(x).copy()]
        outputs.append(run)
        assert backend.launches
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


def test_packed_launch_rejects_python_scalars():
    from cusyncbn import _launch
    with pytest.raises(TypeError, match="np.int32"):
        _launch.pack((np.zeros(3), 4), lambda a: a.ctypes.data)
    with pytest.raises(ValueError, match="at most"):
        _launch.pack((None,) * (_launch.MAX_ARGS + 1), lambda a: 0)


@pytest.mark.parametrize("sms", [1, 132])
def test_emulated_grid_sizes(monkeypatch, sms):
    """One block per channel (sms=1), and an H100-sized grid splitting every channel many
    ways, so the last-block merge runs; its tickets are back to zero after every launch."""
    backend = cuda_emu.EmuBackend(sms=sms)
    monkeypatch.setitem(_backend._backends, "cpu", backend)
    for fmt, shape in (("NCHW", (16, 3, 40, 41)), ("NHWC", (16, 20, 41, 8)), ("NC", (3001, 5))):
        check_layer(fmt, shape, "float32", to_device, to_host, device="cpu", seed=sms)
    splits = {"cs": [], "cl": []}          # grids: channel-second (splits, C), channel-last (tiles, splits)
    for expr, grid in backend.grids:
        if expr.startswith(("moments_c", "backward_c")):
            layout = expr.split("<")[0][-2:]
            splits[layout].append(grid[0] if layout == "cs" else grid[1])
    assert min(max(splits["cs"]), max(splits["cl"])) > (4 if sms == 132 else 1)
    tickets = [v for k, v in backend._scratch.items() if k[0] == "tickets"]
    assert tickets and all(not t.any() for t in tickets)


@pytest.mark.parametrize("sms", [1, 132])
def test_more_channels_than_grid_rows(monkeypatch, sms):
    """Channel-second reductions loop over the channels beyond grid.y (65535 on a GPU, 2 here)."""
    backend = cuda_emu.EmuBackend(sms=sms)
    backend._max_grid_y = 2
    monkeypatch.setitem(_backend._backends, "cpu", backend)
    check_layer("NCHW", (6, 5, 9, 8), "float32", to_device, to_host, device="cpu")
    check_layer("NCL", (4, 7, 33), "float16", to_device, to_host, device="cpu")
    assert {g[1] for e, g in backend.grids if e.startswith(("moments_cs", "backward_cs"))} == {2}


def test_results_do_not_depend_on_block_order(monkeypatch):
    """The last block to finish merges the splits in index order: bitwise the same results
    whichever block arrives last (blocks run in index order, then in two shuffled orders)."""
    results = []
    for order in (0, 1, 2024):
        monkeypatch.setitem(_backend._backends, "cpu", cuda_emu.EmuBackend(sms=132, block_order=order))
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
    """Both layouts with runs of 8, 4 and 2 elements (odd counts around them, so that the
    widest vector dividing the extent is that run), aligned and misaligned, every dtype and
    parameter dtype: together they launch every kernel the CuPy backend can launch."""
    shapes = [(fmt, shape) for k in (8, 4, 2) for fmt, shape in (("NCHW", (3, 5, 1, k)), ("NHWC", (3, 1, 1, k)))]
    for dtype in TOL:
        for pdtype in ("float32", "float64"):
            for fmt, shape in shapes:
                for misalign in (False, True):
                    def dev(a, dt, misalign=misalign):
                        return to_device(a, dt, misalign and dt == dtype)
                    check_layer(fmt, shape, dtype, dev, to_host, device="cpu", param_dtype=pdtype)
    every = {e for d in TOL for e in _kernels.name_expressions(d).values()}
    assert every - set(emu.launches) == set()


def test_misaligned_input_takes_the_scalar_path(emu):
    x = to_device(np.random.default_rng(0).normal(size=(4, 8, 4, 4)), "float32", misalign=True)
    bn = cusyncbn.SyncBatchNorm(8)
    bn(x)
    assert "normalize<float, false, 1>" in emu.launches and "normalize<float, false, 4>" not in emu.launches


def test_elementwise_vectors_straddle_channels(emu):
    """Runs of 3 elements per channel under 8-wide half vectors, rows of 6 channels under
    4-wide float vectors: the elementwise passes stay vectorized (and correct)."""
    check_layer("NCHW", (8, 4, 1, 3), "float16", to_device, to_host, device="cpu")
    check_layer("NHWC", (4, 3, 5, 6), "float32", to_device, to_host, device="cpu")
    for expr in ("normalize<half_t, false, 8>", "backward_elementwise<half_t, false, 8>",
                 "normalize<float, true, 4>", "backward_elementwise<float, true, 4>"):
        assert expr in emu.launches
    assert "moments_cs<half_t, float, 1>" in emu.launches          # reductions keep vectors in a channel


# ---- negative controls: the emulator reports what would fail on a GPU ---------------------

def test_rejects_wrong_argument_types():
    k = cuda_emu.library().kernel("eval_finalize<float, float>")
    rm32, rv32, rm64 = np.zeros(4, np.float32), np.ones(4, np.float32), np.zeros(4)
    stats = np.zeros(16, np.float32)
    k((1,), (32,), (rm32, rv32, np.int32(4), np.float64(1e-5), None, None, stats))     # the right types run
    np.testing.assert_allclose(stats[4:8], 1 / np.sqrt(1 + 1e-5), rtol=1e-6)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="scalar kind"):
        k((1,), (32,), (rm32, rv32, np.int64(4), np.float64(1e-5), None, None, stats))
    with pytest.raises(cuda_emu.EmulatedKernelError, match="scalar kind"):
        k((1,), (32,), (rm32, rv32, np.int32(4), np.float32(1e-5), None, None, stats))
    with pytest.raises(cuda_emu.EmulatedKernelError, match="points to"):
        k((1,), (32,), (rm64, rv32, np.int32(4), np.float64(1e-5), None, None, stats))
    with pytest.raises(cuda_emu.EmulatedKernelError, match="takes 7 arguments"):
        k((1,), (32,), (rm32, rv32, np.int32(4), np.float64(1e-5), None, None))


def test_catches_misaligned_vector_access_and_bad_launches():
    backend = cuda_emu.EmuBackend()
    x = to_device(np.ones((2, 3, 8)), "float32", misalign=True)
    y = backend.empty(x.shape, np.float32)
    stats = backend.zeros((12,), np.float32)
    k = backend._kernel("float32", "normalize_false4")
    args = (x, y, np.int64(x.size), np.int32(3), np.int64(8), stats)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="misaligned 16-byte"):
        k((1,), (256,), args)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="invalid grid"):
        k((1, 70000), (256,), args)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="invalid block"):
        k((1,), (2048,), args)
    moments = backend._kernel("float32", "moments_cs1_float32")
    part, ticket, buf = backend.zeros((9,), np.float64), backend.zeros((3,), np.uint32), backend.zeros((7,), np.float64)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="partial warp"):
        moments((1, 3), (48,), (x, np.int64(2), np.int32(3), np.int64(8), None, part, ticket, buf))


def test_catches_writes_outside_an_allocation():
    backend = cuda_emu.EmuBackend()
    x = to_device(np.ones((2, 3, 8)), "float32")
    y_short = backend.empty((x.size - 1,), np.float32)
    stats = backend.zeros((12,), np.float32)
    with pytest.raises(cuda_emu.EmulatedKernelError, match="wrote outside"):
        backend._kernel("float32", "normalize_false1")((1,), (256,), (x, y_short, np.int64(x.size), np.int32(3),
                                                                      np.int64(8), stats))


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
    "Chan's merge without its between-group term": ("r.m2 = a.m2 + b.m2 + d * d * (a.n * b.n / n);",
                                                    "r.m2 = a.m2 + b.m2;"),
    "last-block ticket never reset": ("if (last) *ticket = 0;", ""),
    "dx without the mean-of-dy term": ("mdy = (S)(buf[c] * inv_n);", "mdy = 0;"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_bug_in_the_kernels_fails_the_layer_check(monkeypatch, mutation):
    """syncbn.cu with one deliberate bug: the layer checks must fail (two training steps,
    on a grid that splits channels, so the tickets are reused)."""
    good, bad = MUTATIONS[mutation]
    source = _kernels.source()
    assert source.count(good) == 1
    broken = cuda_emu.Library(source.replace(good, bad), cuda_emu._expressions())
    monkeypatch.setitem(_backend._backends, "cpu", cuda_emu.EmuBackend(sms=132, kernels=broken))
    with pytest.raises(AssertionError):
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
    emu.empty = lambda shape, dtype: shapes.append(tuple(np.atleast_1d(shape))) or allocate(shape, dtype)
    bn.weight.grad[...] = 0
    bn.bias.grad[...] = 0
    y, dx = bn(x), bn.backward(dy)
    assert shapes == [(4, 8, 25), (4, 8, 25)]                # y and dx, nothing else
    np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx0, rtol=1e-6, atol=1e-6)
    with cusyncbn.no_grad():
        bn(x)
    bn.eval()
    bn(x)
    assert len(shapes) == 4
