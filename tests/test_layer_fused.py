"""The fused epilogue of the Paddle-style layers: ``act="relu"`` and ``forward(x, residual)``
give ``y = act(BN(x) + residual)``, ``backward(dy)`` gives ``dx`` or ``(dx, dresidual)``;
checked against the float64 reference's fused forms (``cusyncbn._reference.fused_*``, with
tests/fused_check.py's tolerances) in every mode, layout and dtype, on one process. The
multi-rank case is ``fused_epilogue_matches_global_reference`` in tests/mpi_worker.py."""
import re

import numpy as np
import pytest

import cusyncbn
import reference as ref
from comms import CountingComm
from cusyncbn import _backend_numpy
from fused_check import TOL, close
from test_fused import numpy_dtype, to_host as host

EPS = 1e-5
SHAPES = {"NC": (6, 3), "NCL": (4, 3, 5), "NCHW": (3, 3, 4, 2), "NCDHW": (2, 3, 2, 3, 2),
          "NLC": (4, 5, 3), "NHWC": (3, 4, 2, 3), "NDHWC": (2, 2, 3, 2, 3)}
LOCAL = {"NC": cusyncbn.BatchNorm1D, "NCL": cusyncbn.BatchNorm1D, "NLC": cusyncbn.BatchNorm1D,
         "NCHW": cusyncbn.BatchNorm2D, "NHWC": cusyncbn.BatchNorm2D, "NCDHW": cusyncbn.BatchNorm3D,
         "NDHWC": cusyncbn.BatchNorm3D}
EPILOGUES = [("relu", True), ("relu", False), (None, True)]
# mode -> (training, use_global_stats): batch statistics in "train" and "batch stats in eval".
MODES = {"train": (True, None), "eval": (False, None), "global stats in training": (True, True),
         "batch stats in eval": (False, False)}


def run_and_compare(bn, data_format, shape, dtype, act, residual, steps=2, seed=0):
    """``steps`` forward + backward passes of ``bn`` (fresh gradients each), each against the
    reference of the pass the layer's mode makes: y, dx, dresidual, weight.grad, bias.grad and
    the running statistics. ``act`` is what the reference applies (the layer's own ``act`` is
    the one under test). Returns the number of passes compared."""
    rng = np.random.default_rng(seed)
    dt = numpy_dtype(dtype)
    c = bn.num_features
    batch = bn.training if bn._use_global_stats is None else not bn._use_global_stats
    if bn.weight is not None:
        bn.weight.data[...] = rng.uniform(0.5, 1.5, c)
        bn.bias.data[...] = rng.normal(size=c)
    w = 1.0 if bn.weight is None else host(bn.weight.data)
    b = 0.0 if bn.bias is None else host(bn.bias.data)
    momentum, tol = bn.momentum, TOL[dtype]
    for step in range(steps):
        x = rng.normal(0.5, 2.0, size=shape).astype(dt)
        dy = rng.normal(size=shape).astype(dt)
        r = rng.normal(size=shape).astype(dt) if residual else None
        xs, dys, rs = host(x), host(dy), (host(r) if residual else None)       # the values the passes see
        rm, rv = host(bn.running_mean), host(bn.running_var)
        bn.clear_gradients()
        y = bn(x, r) if residual else bn(x)
        grads = bn.backward(dy)
        if residual:
            assert isinstance(grads, tuple) and len(grads) == 2
            dx, dr = grads
        else:
            assert not isinstance(grads, tuple)
            dx, dr = grads, None
        if batch:
            y_ref, mean, var = ref.fused_forward(xs, w, b, EPS, data_format, rs, act)
            dx_ref, dw_ref, db_ref, dr_ref = ref.fused_backward(xs, dys, w, b, EPS, data_format, rs, act)
            rm, rv = ref.update_running(rm, rv, mean, var, xs.size // c, momentum)
        else:
            y_ref = ref.fused_eval_forward(xs, w, b, rm, rv, EPS, data_format, rs, act)
            dx_ref, dw_ref, db_ref, dr_ref = ref.fused_eval_backward(xs, dys, w, b, rm, rv, EPS, data_format, rs, act)
        where = f"{type(bn).__name__} {data_format} {dtype} act={act} residual={residual} step {step}"
        close(y, y_ref, tol, f"{where}: y", host)
        close(dx, dx_ref, tol, f"{where}: dx", host)
        if residual:
            close(dr, dr_ref, tol, f"{where}: dresidual", host)
            assert dr.dtype == x.dtype and dr.shape == x.shape
        if bn.weight is not None:
            close(bn.weight.grad, dw_ref, tol, f"{where}: weight.grad", host, xs.size // c)
            close(bn.bias.grad, db_ref, tol, f"{where}: bias.grad", host, xs.size // c)
        np.testing.assert_allclose(host(bn.running_mean), rm, rtol=1e-4, atol=1e-5, err_msg=f"{where}: running mean")
        np.testing.assert_allclose(host(bn.running_var), rv, rtol=1e-4, atol=1e-5, err_msg=f"{where}: running var")
        assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == x.shape
    return steps


def layer(c=3, **kw):
    kw.setdefault("device", "cpu")
    return cusyncbn.SyncBatchNorm(c, **kw)


@pytest.mark.parametrize("act,residual", EPILOGUES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("data_format", list(SHAPES))
def test_training_then_eval_match_the_fused_reference(data_format, dtype, act, residual):
    pdtype = "float64" if dtype == "float64" else "float32"
    bn = layer(data_format=data_format, dtype=pdtype, momentum=0.7, act=act)
    run_and_compare(bn, data_format, SHAPES[data_format], dtype, act, residual)
    bn.eval()
    run_and_compare(bn, data_format, SHAPES[data_format], dtype, act, residual, steps=1, seed=1)


@pytest.mark.parametrize("act,residual", EPILOGUES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("local", [False, True], ids=["SyncBatchNorm", "BatchNorm1D/2D/3D"])
def test_every_mode_of_every_layer(local, mode, act, residual):
    training, use_global_stats = MODES[mode]
    for data_format in ("NCL", "NHWC", "NCDHW"):
        cls = LOCAL[data_format] if local else cusyncbn.SyncBatchNorm
        comm = {} if local else {"comm": CountingComm()}
        bn = cls(3, data_format=data_format, device="cpu", dtype="float64", momentum=0.6, act=act,
                 use_global_stats=use_global_stats, **comm)
        bn._mean[...] = [0.5, -1.0, 2.0]
        bn._variance[...] = [1.5, 0.25, 4.0]
        bn.train() if training else bn.eval()
        run_and_compare(bn, data_format, SHAPES[data_format], "float64", act, residual)


def test_without_affine_parameters():
    for act, residual in EPILOGUES:
        bn = layer(data_format="NCHW", dtype="float64", act=act, weight_attr=False, bias_attr=False)
        run_and_compare(bn, "NCHW", SHAPES["NCHW"], "float64", act, residual)


def test_the_comparison_can_fail(monkeypatch):
    """Negative controls: a layer without the activation, and a backward that forgets the
    mask (g = dy), both fail the comparison with the fused reference."""
    with pytest.raises(AssertionError, match="y"):
        run_and_compare(layer(data_format="NCHW", dtype="float64"), "NCHW", SHAPES["NCHW"], "float64", "relu", True)
    monkeypatch.setattr(_backend_numpy, "_masked", lambda dy3, y3, rows: dy3[rows])
    with pytest.raises(AssertionError, match="dx"):
        run_and_compare(layer(data_format="NCHW", dtype="float64", act="relu"), "NCHW", SHAPES["NCHW"], "float64",
                        "relu", True)


def test_results_follow_the_forward_being_back_propagated():
    """LIFO: the backward of a forward with a residual returns (dx, dresidual), of one without
    only dx, whatever the order; under no_grad a forward with a residual keeps nothing."""
    rng = np.random.default_rng(3)
    bn = layer(data_format="NC", dtype="float64", act="relu")
    x, r, dy = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    bn(x)
    bn(x, r)
    with cusyncbn.no_grad():
        bn(x, r)
    dx, dr = bn.backward(dy)
    want = ref.fused_backward(x, dy, 1.0, 0.0, EPS, "NC", r, "relu")
    np.testing.assert_allclose(dx, want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dr, want[3], rtol=1e-10, atol=1e-12)
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, ref.fused_backward(x, dy, 1.0, 0.0, EPS, "NC", None, "relu")[0], rtol=1e-10,
                               atol=1e-12)
    with pytest.raises(RuntimeError, match="no pending forward"):
        bn.backward(dy)


def test_residual_keyword_strides_and_output_in_the_inputs_framework():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x, r, dy = rng.normal(size=(4, 3, 6)), rng.normal(size=(4, 3, 6)), rng.normal(size=(4, 3, 6))
    bn = layer(data_format="NCL", dtype="float64", act="relu", output="input")
    y = bn.forward(torch.from_numpy(x), residual=torch.from_numpy(np.asfortranarray(r)))   # any strides
    dx, dr = bn.backward(torch.from_numpy(dy))
    assert all(isinstance(t, torch.Tensor) for t in (y, dx, dr))
    np.testing.assert_allclose(y.numpy(), ref.fused_forward(x, 1.0, 0.0, EPS, "NCL", r, "relu")[0], rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(dr.numpy(), ref.fused_backward(x, dy, 1.0, 0.0, EPS, "NCL", r, "relu")[3])


@pytest.mark.parametrize("act", ["gelu", "ReLU", "relu6", "", True, 1, ["relu"], "none"])
def test_bad_act_is_refused_at_construction_and_builds_nothing(act):
    name = repr(cusyncbn.BatchNorm2D(3, device="cpu"))   # the counter of default names
    nxt = int(name.split("name='batch_norm_")[1].split("'")[0]) + 1
    for make in (lambda: layer(act=act), lambda: cusyncbn.BatchNorm2D(3, device="cpu", act=act),
                 lambda: cusyncbn.BatchNorm1D(3, device="cpu", act=act)):
        with pytest.raises(ValueError, match=r"^(SyncBatchNorm|BatchNorm[12]D): act must be None or 'relu' \(the "
                                             rf"fused epilogue's activations\), got {re.escape(repr(act))}; apply "
                                             "other activations as layers of their own$"):
            make()
    assert f"name='batch_norm_{nxt}'" in repr(cusyncbn.BatchNorm2D(3, device="cpu"))   # no name was taken


def test_act_is_a_setting_shown_by_repr_and_kept_out_of_state_dicts(tmp_path):
    bn = layer(act="relu", name="bn_act")
    assert bn.act == "relu" and layer().act is None
    assert repr(bn).endswith("device='cpu', act='relu')") and "act" not in repr(layer())
    with pytest.raises(AttributeError):
        bn.act = None                                       # read-only, as momentum
    bn(np.random.default_rng(5).normal(size=(4, 3)).astype("float32"))
    assert list(bn.state_dict()) == ["weight", "bias", "_mean", "_variance"]
    cusyncbn.save_checkpoint(bn, tmp_path / "bn.npz")
    plain = layer()
    cusyncbn.load_checkpoint(plain, tmp_path / "bn.npz")    # a checkpoint holds no settings: any act loads it
    np.testing.assert_array_equal(plain.running_mean, bn.running_mean)
    assert plain.act is None
    assert sorted(cusyncbn.export_state_dict(bn, "paddle")) == ["_mean", "_variance", "bias", "weight"]


def test_converter_carries_act():
    rng = np.random.default_rng(6)
    old = cusyncbn.BatchNorm2D(3, device="cpu", dtype="float64", act="relu")
    new = cusyncbn.SyncBatchNorm.convert_sync_batchnorm({"bn": old}, comm=CountingComm())["bn"]
    assert type(new) is cusyncbn.SyncBatchNorm and new.act == "relu"
    x, r = rng.normal(size=(3, 3, 2, 2)), rng.normal(size=(3, 3, 2, 2))
    np.testing.assert_allclose(new(x, r), ref.fused_forward(x, 1.0, 0.0, EPS, "NCHW", r, "relu")[0], rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("residual, kind, words", [
    (np.ones((4, 3)), ValueError, r"^bn_r: residual has shape \(4, 3\), expected \(4, 3, 5\)"),
    (np.ones((4, 5, 3)), ValueError, r"^bn_r: residual has shape \(4, 5, 3\), expected \(4, 3, 5\)"),
    (np.ones((4, 3, 5), np.float32), TypeError, "^bn_r: residual has dtype float32, expected x's dtype float64"),
    ("residual", TypeError, "^residual must be an array .* got str"),     # as x's message
    (None, None, None),                                         # the control: a valid call changes things
])
def test_bad_residual_raises_and_changes_nothing(residual, kind, words):
    comm = CountingComm()
    rng = np.random.default_rng(7)
    bn = layer(data_format="NCL", dtype="float64", act="relu", comm=comm, name="bn_r")
    bn(rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5)))
    bn.backward(rng.normal(size=(4, 3, 5)))                    # the first call's extra all-reduce is past
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    grads = [bn.weight.grad.copy(), bn.bias.grad.copy()]
    calls = comm.calls
    x = rng.normal(size=(4, 3, 5))
    if kind is None:
        bn(x, rng.normal(size=(4, 3, 5)))
        assert comm.calls == calls + 1 and len(bn._pending) == 1
        assert not np.array_equal(bn.running_mean, before["_mean"])
        return
    with pytest.raises(kind, match=words):
        bn(x, residual)
    assert comm.calls == calls and bn._pending == []
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    np.testing.assert_array_equal(bn.weight.grad, grads[0])
    np.testing.assert_array_equal(bn.bias.grad, grads[1])
    with pytest.raises(RuntimeError, match="no pending forward"):
        bn.backward(np.ones((4, 3, 5)))


def test_one_collective_per_pass_with_the_epilogue():
    comm = CountingComm()
    bn = layer(data_format="NHWC", act="relu", comm=comm)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 3, 2, 3)).astype("float32")
    bn.backward(np.ones_like(bn(x, x)))                        # a layer's first forward: two all-reduces
    calls = comm.calls
    y = bn(x, x)
    assert comm.calls == calls + 1
    bn.backward(np.ones_like(y))
    assert comm.calls == calls + 2
    bn.eval()
    bn.backward(np.ones_like(bn(x, x)))
    assert comm.calls == calls + 2
