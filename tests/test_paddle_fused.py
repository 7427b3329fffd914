"""The fused epilogue of cusyncbn.paddle.SyncBatchNorm: ``act="relu"`` (``paddle.nn.BatchNorm``'s
``act``) and ``forward(x, residual)`` give ``relu(BN(x) + residual)`` through the PyLayer, the
residual getting its gradient through Paddle's autograd. Checked against Paddle's own batch
norms followed by ``+ residual`` and ``paddle.nn.functional.relu`` (float64, every layout and
mode) and against the float64 reference's fused forms (16-bit inputs too). The multi-rank case
is ``fused_epilogue_uneven_batches`` in tests/paddle_worker.py."""
import copy
import re
from unittest import mock

import numpy as np
import pytest

import reference as ref
from fused_check import TOL
from fused_check import close as close_to_reference

paddle = pytest.importorskip("paddle")
import cusyncbn.paddle as cbp  # noqa: E402
from test_paddle import FORMATS, MOMENTUM, MirrorComm, close, float64_and_quiet, on_gpu, randomize  # noqa: E402,F401

EPILOGUES = [("relu", True), ("relu", False), (None, True)]


def epilogue(y, residual, act):
    """What the fused layer computes after the batch norm, written with Paddle's own ops."""
    y = y if residual is None else y + residual
    return paddle.nn.functional.relu(y) if act == "relu" else y


def step(model, x, r, dy, act, fused):
    """Forward + backward of sum(y * dy), the epilogue fused (``fused``) or by Paddle's ops;
    returns y, x.grad, residual.grad and the parameter gradients (host arrays)."""
    xt = paddle.to_tensor(x, stop_gradient=False)
    rt = None if r is None else paddle.to_tensor(r, stop_gradient=False)
    y = model(xt, rt) if fused else epilogue(model(xt), rt, act)
    (y * paddle.to_tensor(dy)).sum().backward()
    out = [y.numpy(), xt.grad.numpy(), None if rt is None else rt.grad.numpy()]
    out += [p.grad.numpy() for p in (model.weight, model.bias) if p is not None and p.grad is not None]
    model.clear_gradients()
    return out


def compare(ours, theirs, shape, act, residual, steps=3, seed=1):
    rng = np.random.default_rng(seed)
    for i in range(steps):
        x, dy = rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape)
        r = rng.normal(size=shape) if residual else None
        got, want = step(ours, x, r, dy, act, True), step(theirs, x, r, dy, act, False)
        assert len(got) == len(want)
        for what, a, b in zip(("y", "x.grad", "residual.grad", "weight.grad", "bias.grad"), got, want):
            assert (a is None) == (b is None), what
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=f"step {i} {what}")
        close(ours._mean.numpy(), theirs._mean.numpy()), close(ours._variance.numpy(), theirs._variance.numpy())


@pytest.mark.parametrize("act,residual", EPILOGUES)
@pytest.mark.parametrize("cls,data_format,shape", FORMATS, ids=[f for _, f, _ in FORMATS])
def test_matches_paddles_batch_norm_add_and_relu(cls, data_format, shape, act, residual):
    theirs = randomize(cls(3, momentum=MOMENTUM, data_format=data_format))
    ours = cbp.SyncBatchNorm(3, momentum=MOMENTUM, data_format=data_format, act=act)
    ours.set_state_dict(theirs.state_dict())
    compare(ours, theirs, shape, act, residual)
    ours.eval(), theirs.eval()
    compare(ours, theirs, shape, act, residual, steps=1, seed=2)


@pytest.mark.parametrize("use_global_stats", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_use_global_stats_modes(use_global_stats, training):
    theirs = randomize(paddle.nn.BatchNorm2D(3, momentum=MOMENTUM, use_global_stats=use_global_stats))
    ours = cbp.SyncBatchNorm(3, momentum=MOMENTUM, use_global_stats=use_global_stats, act="relu")
    ours.set_state_dict(theirs.state_dict())
    for m in (ours, theirs):
        m.train() if training else m.eval()
    if training or use_global_stats:
        compare(ours, theirs, (4, 3, 2, 3), "relu", True, steps=2)
    else:
        # Paddle back-propagates this mode as if the running statistics had been used (see
        # test_paddle.py): the reference is the gradient of the batch-statistics forward.
        rng = np.random.default_rng(3)
        x, r, dy = (rng.normal(size=(4, 3, 2, 3)) for _ in range(3))
        w, b = ours.weight.numpy(), ours.bias.numpy()
        y, dx, dr, dw, db = step(ours, x, r, dy, "relu", True)
        want = ref.fused_backward(x, dy, w, b, 1e-5, "NCHW", r, "relu")
        close(y, ref.fused_forward(x, w, b, 1e-5, "NCHW", r, "relu")[0], 1e-9)
        for got, expected in zip((dx, dw, db, dr), want):
            close(got, expected, 1e-9)


@pytest.mark.parametrize("act,residual", EPILOGUES)
@pytest.mark.parametrize("dtype", list(TOL))
def test_against_the_fused_reference(dtype, act, residual):
    """Two training steps and an eval step against ``cusyncbn._reference``'s fused forms:
    float32 / float64 in the layer's dtype, float16 / bfloat16 with float32 parameters."""
    pdtype = "float64" if dtype == "float64" else "float32"
    paddle.set_default_dtype(pdtype)
    bn = randomize(cbp.SyncBatchNorm(4, momentum=MOMENTUM, data_format="NHWC", act=act), seed=4)
    w, b = bn.weight.numpy().astype(np.float64), bn.bias.numpy().astype(np.float64)
    rng = np.random.default_rng(5)
    shape = (5, 3, 2, 4)
    tol = TOL[dtype]

    def host(t):
        return t.astype("float32").numpy().astype(np.float64) if t.dtype == paddle.bfloat16 else \
            t.numpy().astype(np.float64)
    for i in range(3):
        if i == 2:
            bn.eval()
        rm, rv = host(bn._mean), host(bn._variance)
        x = paddle.to_tensor(rng.normal(0.5, 2.0, size=shape).astype("float32")).astype(dtype)
        dy = paddle.to_tensor(rng.normal(size=shape).astype("float32")).astype(dtype)
        r = paddle.to_tensor(rng.normal(size=shape).astype("float32")).astype(dtype) if residual else None
        for t in (x, r):
            if t is not None:
                t.stop_gradient = False
        y = bn(x, r)
        (y.astype("float32") * dy.astype("float32")).sum().backward()      # no CPU 16-bit multiply
        xs, dys, rs = host(x), host(dy), (host(r) if residual else None)
        if bn.training:
            want_y, mean, var = ref.fused_forward(xs, w, b, 1e-5, "NHWC", rs, act)
            want = ref.fused_backward(xs, dys, w, b, 1e-5, "NHWC", rs, act)
            rm, rv = ref.update_running(rm, rv, mean, var, xs.size // 4, MOMENTUM)
        else:
            want_y = ref.fused_eval_forward(xs, w, b, rm, rv, 1e-5, "NHWC", rs, act)
            want = ref.fused_eval_backward(xs, dys, w, b, rm, rv, 1e-5, "NHWC", rs, act)
        where = f"{dtype} act={act} residual={residual} step {i}"
        close_to_reference(y, want_y, tol, f"{where}: y", host)
        close_to_reference(x.grad, want[0], tol, f"{where}: x.grad", host)
        close_to_reference(bn.weight.grad, want[1], tol, f"{where}: weight.grad", host, xs.size // 4)
        close_to_reference(bn.bias.grad, want[2], tol, f"{where}: bias.grad", host, xs.size // 4)
        if residual:
            close_to_reference(r.grad, want[3], tol, f"{where}: residual.grad", host)
            assert r.grad.dtype == x.dtype
        np.testing.assert_allclose(host(bn._mean), rm, rtol=1e-5, atol=1e-6, err_msg=where)
        np.testing.assert_allclose(host(bn._variance), rv, rtol=1e-5, atol=1e-6, err_msg=where)
        assert y.dtype == x.grad.dtype == x.dtype
        bn.clear_gradients()


def test_the_comparisons_can_fail():
    """Negative controls: a layer without act against Paddle's batch norm + relu, and a layer
    whose residual is zeroed before the core, both fail."""
    theirs = randomize(paddle.nn.BatchNorm1D(3, momentum=MOMENTUM, data_format="NC"))
    ours = cbp.SyncBatchNorm(3, momentum=MOMENTUM, data_format="NC")
    ours.set_state_dict(theirs.state_dict())
    with pytest.raises(AssertionError, match="step 0 y"):
        compare(ours, theirs, (6, 3), "relu", True)
    core = cbp._core_forward
    with mock.patch.object(cbp, "_core_forward", lambda x, r, arrays, settings: core(x, None if r is None else r * 0,
                                                                                     arrays, settings)):
        with pytest.raises(AssertionError, match="y"):
            test_against_the_fused_reference("float64", None, True)


def test_act_setting_repr_state_dict_and_the_pylayers_settings():
    bn = cbp.SyncBatchNorm(3, act="relu", comm=MirrorComm(), data_format="NC")
    assert bn._act == "relu" and "act=relu" in repr(bn) and "act" not in repr(cbp.SyncBatchNorm(3))
    assert list(bn.state_dict()) == list(paddle.nn.SyncBatchNorm(3).state_dict())
    x = paddle.to_tensor(np.random.default_rng(6).normal(size=(4, 3)), stop_gradient=False)
    r = paddle.to_tensor(np.random.default_rng(7).normal(size=(4, 3)), stop_gradient=False)
    with mock.patch.object(cbp._Function, "apply", wraps=cbp._Function.apply) as apply:
        y = bn(x, r)
    call, = apply.call_args_list
    x_in, weight, bias, r_in, arrays, settings = call.args
    assert x_in is x and r_in is r and settings.activation == "relu"
    assert not any(isinstance(v, paddle.nn.Layer) for v in (*call.args, *settings))
    y.sum().backward()
    close(r.grad.numpy(), (y.numpy() > 0).astype(np.float64))


def test_a_residual_needing_no_gradient_and_one_needing_it_alone():
    comm = MirrorComm()
    bn = cbp.SyncBatchNorm(3, act="relu", comm=comm, data_format="NCL")
    rng = np.random.default_rng(8)
    x = paddle.to_tensor(rng.normal(size=(4, 3, 5)), stop_gradient=False)
    frozen = paddle.to_tensor(rng.normal(size=(4, 3, 5)))               # stop_gradient: gets None
    bn(x, frozen).sum().backward()
    assert frozen.grad is None and x.grad is not None and bn.weight.grad is not None
    for p in bn.parameters():
        p.stop_gradient = True
    x = paddle.to_tensor(rng.normal(size=(4, 3, 5)))
    r = paddle.to_tensor(rng.normal(size=(4, 3, 5)), stop_gradient=False)
    calls = comm.calls
    y = bn(x, r)
    y.sum().backward()
    assert comm.calls == calls + 1                                     # no dx wanted: no backward all-reduce
    close(r.grad.numpy(), (y.numpy() > 0).astype(np.float64))
    with paddle.no_grad():
        close(bn(x, r).numpy(), y.numpy())


def test_converted_batchnorm_act_relu_is_fused_and_other_acts_follow_it():
    for act in ("relu", "sigmoid"):
        old = randomize(paddle.nn.BatchNorm(3, act=act, momentum=MOMENTUM, dtype="float64"))
        reference = copy.deepcopy(old)
        new = cbp.convert_sync_batchnorm(old)
        assert new._act == act
        x = np.random.default_rng(9).normal(size=(5, 3, 2, 2))
        with mock.patch.object(cbp._Function, "apply", wraps=cbp._Function.apply) as apply:
            got = step(new, x, None, np.ones_like(x), None, True)
        assert apply.call_args.args[-1][-1] == ("relu" if act == "relu" else None)   # fused, or applied after
        want = step(reference, x, None, np.ones_like(x), None, False)   # its own act
        for a, b in zip(got, want):
            if a is not None:
                close(a, b, 1e-9)
        r = np.random.default_rng(10).normal(size=x.shape)               # and with a residual
        y = new(paddle.to_tensor(x), paddle.to_tensor(r)).numpy()
        pre = ref.fused_eval_forward(x, new.weight.numpy(), new.bias.numpy(), new._mean.numpy(),
                                     new._variance.numpy(), 1e-5, "NCHW", r) if not new.training else None
        if pre is None:
            pre = ref.fused_forward(x, new.weight.numpy(), new.bias.numpy(), 1e-5, "NCHW", r)[0]
        close(y, np.maximum(pre, 0) if act == "relu" else 1 / (1 + np.exp(-pre)), 1e-6)


@pytest.mark.parametrize("act", ["gelu", "sigmoid", "ReLU", True, ["relu"]])
def test_bad_act_is_refused(act):
    with pytest.raises(ValueError, match=r"^SyncBatchNorm: act must be None or 'relu' \(the fused epilogue's "
                                         r"activations\), got .*; apply other activations as layers of their own$"):
        cbp.SyncBatchNorm(3, act=act)


@pytest.mark.parametrize("residual, kind, words", [
    (paddle.zeros([4, 3]), ValueError, r"residual has shape \[4, 3\], expected x's \[4, 3, 2\]"),
    (paddle.zeros([4, 3, 2], dtype="float32"), TypeError, "residual has dtype paddle.float32, expected x's "
                                                          "paddle.float64"),
    (np.zeros((4, 3, 2)), TypeError, r"residual must be a paddle.Tensor \(or None\), got ndarray"),
    (None, None, None),                                         # the control: a valid call changes things
])
def test_bad_residual_raises_and_changes_nothing(residual, kind, words):
    comm = MirrorComm()
    bn = cbp.SyncBatchNorm(3, act="relu", comm=comm, data_format="NCL")
    before = {k: v.numpy().copy() for k, v in bn.state_dict().items()}
    x = paddle.to_tensor(np.random.default_rng(11).normal(size=(4, 3, 2)), stop_gradient=False)
    if kind is None:
        bn(x, paddle.zeros([4, 3, 2], dtype="float64")).sum().backward()
        assert comm.calls > 0 and x.grad is not None
        return
    with pytest.raises(kind, match=f"^{re.escape(bn._where())}: {words}"):
        bn(x, residual)
    assert comm.calls == 0 and x.grad is None
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), before[k])


# -- GPU (Paddle built with CUDA, and CuPy) ------------------------------------------------

@pytest.mark.gpu
@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize("act,residual", EPILOGUES)
@pytest.mark.parametrize("data_format,dtype", [("NCHW", "float64"), ("NHWC", "float32")])
def test_gpu_matches_paddles_batch_norm_add_and_relu(data_format, dtype, act, residual):
    """On a GPU (the CUDA kernels' epilogue): against Paddle's own BatchNorm2D followed by
    ``+ residual`` and ``relu``, training then eval."""
    paddle.set_default_dtype(dtype)
    theirs = randomize(paddle.nn.BatchNorm2D(5, momentum=MOMENTUM, data_format=data_format))
    ours = cbp.SyncBatchNorm(5, momentum=MOMENTUM, data_format=data_format, act=act)
    ours.set_state_dict(theirs.state_dict())
    rng = np.random.default_rng(12)
    shape = (6, 5, 7, 3) if data_format == "NCHW" else (6, 7, 3, 5)
    tol = 1e-9 if dtype == "float64" else 1e-4
    for i in range(3):
        if i == 2:
            ours.eval(), theirs.eval()
        x, dy = rng.normal(1, 2, size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)
        r = rng.normal(size=shape).astype(dtype) if residual else None
        got, want = step(ours, x, r, dy, act, True), step(theirs, x, r, dy, act, False)
        for a, b in zip(got, want):
            if a is not None:
                close(a, b, tol)
        close(ours._mean.numpy(), theirs._mean.numpy(), tol)
        close(ours._variance.numpy(), theirs._variance.numpy(), tol)
