"""The fused epilogue, y = act(BN(x) + residual), of the functional core on the NumPy backend,
against the float64 reference written from the formulas (tests/fused_check.py)."""
import numpy as np
import pytest

import reference as ref
from comms import CountingComm
from cusyncbn import _backend_numpy
from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
from fused_check import TOL, check_fused
from test_functional import refused_and_changed_nothing

SHAPES = [("NCHW", (4, 5, 3, 3)), ("NHWC", (3, 4, 3, 6)), ("NC", (13, 5)), ("NCL", (3, 4, 7))]
EPILOGUES = [("relu", True), ("relu", False), (None, True)]


def numpy_dtype(dtype):
    if dtype == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(dtype)


def to_host(a):
    return np.asarray(a).astype(np.float64)


@pytest.mark.parametrize("activation,residual", EPILOGUES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("data_format,shape", SHAPES)
def test_numpy_backend_matches_reference(data_format, shape, dtype, activation, residual):
    dt = numpy_dtype(dtype)
    check_fused(data_format, shape, dtype, activation, residual, lambda a, d, role: np.asarray(a).astype(
        dt if d == dtype else d), to_host)


def test_the_reference_comparison_can_fail(monkeypatch):
    """Negative control: a backward that forgets the mask (g = dy) fails the check."""
    monkeypatch.setattr(_backend_numpy, "_masked", lambda dy3, y3, rows: dy3[rows])
    with pytest.raises(AssertionError, match="dx"):
        check_fused("NCHW", (4, 5, 3, 3), "float64", "relu", True, lambda a, d, role: np.asarray(a, d), to_host)


def _data(shape=(4, 3, 5), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)


def test_the_mask_is_read_from_y_not_a_stored_copy():
    """The context keeps y itself: y changed in place changes the mask (documented: do not)."""
    x, dy, r = _data()
    y, ctx = sync_batch_norm(x, data_format="NCL", activation="relu", residual=r)
    assert (y == 0).any() and ctx.residual
    y[...] = 1.0                                       # every element "active"
    dx, _, _, dr = sync_batch_norm_backward(ctx, dy)
    np.testing.assert_array_equal(dr, dy)
    np.testing.assert_allclose(dx, ref.backward(x, dy, 1.0, 1e-5, "NCL")[0], rtol=1e-10, atol=1e-12)


def test_results_and_their_count():
    x, dy, r = _data()
    _, ctx = sync_batch_norm(x, data_format="NCL", activation="relu")
    assert len(sync_batch_norm_backward(ctx, dy)) == 3 and not ctx.residual
    y, ctx = sync_batch_norm(x, data_format="NCL", residual=r)
    np.testing.assert_allclose(y, ref.forward(x, 1.0, 0.0, 1e-5, "NCL")[0] + r, rtol=1e-12, atol=1e-12)
    dx, dw, db, dr = sync_batch_norm_backward(ctx, dy)
    np.testing.assert_array_equal(dr, dy)              # no activation: dresidual = dy, a new array
    assert dr is not dy and dw is None and db is None
    _, ctx = sync_batch_norm(x, data_format="NCL", residual=r)
    assert sync_batch_norm_backward(ctx, dy, residual_grad=False)[3] is None


def test_residual_gradient_without_input_gradient_makes_no_collective():
    x, dy, r = _data()
    comm = CountingComm()
    y, ctx = sync_batch_norm(x, np.zeros(3), np.ones(3), data_format="NCL", comm=comm, activation="relu", residual=r)
    calls = comm.calls
    dx, dw, db, dr = sync_batch_norm_backward(ctx, dy, input_grad=False, weight_grad=False, bias_grad=False)
    assert dx is None and dw is None and db is None and comm.calls == calls
    np.testing.assert_array_equal(dr, np.where(y > 0, dy, 0.0))


def test_outputs_given_are_written():
    x, dy, r = _data()
    y_out, dx_out, dr_out = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    y, ctx = sync_batch_norm(x, data_format="NCL", activation="relu", residual=r, out=y_out)
    dx, _, _, dr = sync_batch_norm_backward(ctx, dy, input_grad_out=dx_out, residual_grad_out=dr_out)
    assert y is y_out and dx is dx_out and dr is dr_out
    want = ref.fused_backward(x, dy, 1.0, 0.0, 1e-5, "NCL", r, "relu")
    np.testing.assert_allclose(dx, want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dr, want[3], rtol=1e-10, atol=1e-12)


def test_a_residual_of_any_strides():
    x, dy, r = _data((4, 3, 6))
    strided = np.asfortranarray(r)
    assert not strided.flags.c_contiguous
    y, ctx = sync_batch_norm(x, data_format="NCL", activation="relu", residual=strided)
    np.testing.assert_allclose(y, ref.fused_forward(x, 1.0, 0.0, 1e-5, "NCL", r, "relu")[0], rtol=1e-10, atol=1e-12)
    y, _ = sync_batch_norm(x, data_format="NCL", residual=r[:, :, ::2].repeat(2, axis=2))
    np.testing.assert_allclose(y, ref.forward(x, 1.0, 0.0, 1e-5, "NCL")[0] + r[:, :, ::2].repeat(2, axis=2),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change, kind, words", [
    ({"activation": "gelu"}, ValueError, r"activation must be one of \(None, 'relu'\), got 'gelu'"),
    ({"activation": "ReLU"}, ValueError, "activation must be one of"),
    ({"activation": True}, ValueError, "got True"),
    ({"activation": ["relu"]}, ValueError, "activation must be one of"),
    ({"residual": np.ones((4, 3))}, ValueError, r"residual has shape \(4, 3\), expected \(4, 3, 5\)"),
    ({"residual": np.ones((4, 5, 3))}, ValueError, "residual has shape"),
    ({"residual": np.ones((4, 3, 5), np.float32)}, TypeError, "residual has dtype float32, expected x's dtype float64"),
    ({"residual": "abc"}, TypeError, "residual must be an array"),
    ({"out": "residual"}, ValueError, "out must not be the residual"),
])
def test_bad_epilogues_raise_clear_errors_and_change_nothing(change, kind, words):
    rng = np.random.default_rng(6)
    args = {"x": rng.normal(size=(4, 3, 5)), "running_mean": rng.normal(size=3), "running_var": rng.uniform(1, 2, 3),
            "weight": rng.uniform(0.5, 1.5, 3), "bias": rng.normal(size=3), "data_format": "NCL",
            "comm": CountingComm(), "residual": rng.normal(size=(4, 3, 5)), **change}
    if isinstance(args.get("out"), str):
        args["out"] = args["residual"]
    refused_and_changed_nothing(args, kind, words)


def test_bad_residual_gradient_outputs_raise_and_leave_the_forward_pending():
    x, dy, r = _data()
    comm = CountingComm()
    _, ctx = sync_batch_norm(x, data_format="NCL", comm=comm)
    calls = comm.calls
    with pytest.raises(ValueError, match="residual_grad_out was given, but the forward had no residual"):
        sync_batch_norm_backward(ctx, dy, residual_grad_out=np.empty_like(x))
    _, ctx = sync_batch_norm(x, data_format="NCL", comm=comm, residual=r)
    calls = comm.calls
    out = np.empty_like(x)
    with pytest.raises(ValueError, match="residual_grad_out and input_grad_out must be different arrays"):
        sync_batch_norm_backward(ctx, dy, input_grad_out=out, residual_grad_out=out)
    with pytest.raises(ValueError, match=r"residual_grad_out has shape \(4, 3\)"):
        sync_batch_norm_backward(ctx, dy, residual_grad_out=np.empty((4, 3)))
    with pytest.raises(TypeError, match="residual_grad must be True or False"):
        sync_batch_norm_backward(ctx, dy, residual_grad="yes")
    assert comm.calls == calls and not ctx.consumed
    assert len(sync_batch_norm_backward(ctx, dy)) == 4 and comm.calls == calls + 1


# ---- the CUDA kernels, emulated on the CPU (tests/cuda_emu) --------------------------------------

EMU_SHAPES = [("NCHW", (4, 5, 3, 4)), ("NHWC", (3, 4, 3, 8)), ("NC", (13, 6)), ("NCDHW", (2, 3, 3, 1, 3))]


def emu_to_device(dtype, misalign=None):
    """``to_device`` for the emulated backend: guarded copies, those of role ``misalign`` one
    element off."""
    import cuda_emu
    dt = numpy_dtype(dtype)

    def to_device(a, d, role):
        return cuda_emu.guarded_copy(np.asarray(a).astype(dt if d == dtype else d), misalign=role == misalign)
    return to_device


@pytest.fixture
def emu(use_backend):
    import cuda_emu
    return use_backend(cuda_emu.EmuBackend(sms=4))


@pytest.mark.parametrize("activation,residual", EPILOGUES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("data_format,shape", EMU_SHAPES)
def test_emulated_kernels_match_reference(emu, data_format, shape, dtype, activation, residual):
    """(On the planned path from the second training step: a device is given.)"""
    check_fused(data_format, shape, dtype, activation, residual, emu_to_device(dtype), to_host, device="cpu")
    fused = [e for e in emu.launches if e.startswith(("normalize", "dx"))]
    assert fused, "the emulated backend was not used"


@pytest.mark.parametrize("sms", [1, 132])
def test_emulated_grids_split_and_loop(use_backend, sms):
    """One block per channel, and a grid splitting every channel (the last-block merge of the
    masked sums); channels beyond grid.y (2 here) looped over."""
    import cuda_emu
    backend = use_backend(cuda_emu.EmuBackend(sms=sms))
    backend.max_grid_y = 2
    for fmt, shape in (("NCHW", (16, 3, 9, 9)), ("NHWC", (16, 5, 9, 8))):
        check_fused(fmt, shape, "float32", "relu", True, emu_to_device("float32"), to_host, seed=sms)


@pytest.mark.parametrize("role, narrow", [("residual", "normalize"), ("dy", "dx"), ("x", "backward")])
def test_misaligned_arrays_take_narrower_vectors(emu, role, narrow):
    """x, dy or the residual one element off: the plans' alignment class includes the residual
    (and y and dresidual), so narrower vectors run, with the same results (runs of 256: slabs,
    _tuning.layout_for)."""
    check_fused("NCHW", (4, 4, 16, 16), "float32", "relu", True, emu_to_device("float32", misalign=role), to_host)
    assert any(e.startswith(f"{narrow}_cs<") and e.endswith(", 1>") for e in emu.launches)
    if role == "residual":
        assert "backward_cs<float, float, 4>" in emu.launches and "dx_cs<float, 4>" in emu.launches


def test_every_instantiation_runs_its_epilogue(emu):
    """Slabs and row tiles with runs of 8, 4 and 2 elements (channel-second runs of 257 k, long
    enough for slabs), aligned and with x misaligned, every dtype: the epilogue's loops of every
    kernel the CuPy backend can launch (for the default parameter dtype) run and match the
    reference."""
    import cuda_emu  # noqa: F401 (the fixture's module)
    from cusyncbn import _kernels
    shapes = [(fmt, shape) for k in (8, 4, 2) for fmt, shape in (("NCHW", (1, 3, 1, 257 * k)),
                                                                 ("NHWC", (3, 1, 1, k)))]
    for dtype in TOL:
        for fmt, shape in shapes:
            for misalign in (None, "x"):
                check_fused(fmt, shape, dtype, "relu", True, emu_to_device(dtype, misalign), to_host, steps=1)
    every = {e for d in TOL for e in _kernels.name_expressions(d).values()
             if e.startswith(("moments", "dx")) or (", double," in e) == (d == "float64")}
    assert every - set(emu.launches) == set()


MUTATIONS = {
    "mask ignored": ("g[e] = yv[e] > 0 ? g[e] : (S)0;", "g[e] = g[e];"),
    "residual not added": ("for (int e = 0; e < io::vec; ++e) v[e] += d[e];", "for (int e = 0; e < io::vec; ++e) {}"),
    "dresidual not written": ("if (dresidual != nullptr) io::store(dresidual + at, gv);\n"
                                                      "    if (dx == nullptr) return;",
                                                      "if (dx == nullptr) return;"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_bug_in_the_epilogue_fails_the_check(use_backend, mutation):
    """Negative controls: syncbn.cu with one deliberate bug in the epilogue fails the check."""
    import cuda_emu
    use_backend(cuda_emu.EmuBackend(sms=4, kernels=cuda_emu.mutated(*MUTATIONS[mutation])))
    with pytest.raises(AssertionError):
        check_fused("NCHW", (4, 5, 3, 4), "float32", "relu", True, emu_to_device("float32"), to_host, steps=1)
