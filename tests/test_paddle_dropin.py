"""cusyncbn.paddle.SyncBatchNorm behaves as Paddle's own layers in every mode, dtype and
error case (issue 17, section 2), and cusyncbn.paddle.convert_sync_batchnorm keeps what it
replaces (section 3). Paddle itself is the reference for behaviour (its BatchNorm layers
on one process with the whole batch on the CPU; its own SyncBatchNorm on a GPU, marked
gpu), the float64 reference on the global batch for values. The multi-rank versions are
cases of tests/paddle_worker.py, run by tests/test_paddle.py."""
import copy
import warnings

import numpy as np
import pytest

import reference as ref
from comms import CountingComm

paddle = pytest.importorskip("paddle")
import cusyncbn.paddle as cbp  # noqa: E402
from test_paddle import on_gpu, paddle_defaults, randomize  # noqa: E402,F401 (on_gpu: a fixture)

EPS = 1e-5
MOMENTUM = 0.75                 # exact in float32: Paddle keeps momentum as a float32 attribute
# Largest relative rounding error of a 16-bit float (round to nearest: half an ulp at 1).
HALF_ULP = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


@pytest.fixture(autouse=True)
def default_dtype():
    with paddle_defaults("float32"):
        yield


def host(t):
    """A Paddle tensor (any float dtype) as float64 NumPy."""
    return t.astype("float32").numpy().astype(np.float64) if t.dtype in (paddle.bfloat16, paddle.float16) \
        else t.numpy().astype(np.float64)


def close(got, want, rtol=1e-10, atol=1e-10):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def within_16bit(got, want, dtype, atol):
    """Whether ``got`` (16-bit results) is ``want`` (float64) rounded to ``dtype``, up to
    float32 arithmetic (``atol``): |got - want| <= half an ulp of ``want`` + atol."""
    return bool(np.all(np.abs(got - want) <= HALF_ULP[dtype] * np.abs(want) + atol))


def state(layer):
    """Every parameter and running statistic of ``layer`` and every gradient, as NumPy."""
    out = {name: t.numpy().copy() for name, t in layer.state_dict().items()}
    out.update({f"{name}.grad": p.grad.numpy().copy() for name, p in layer.named_parameters() if p.grad is not None})
    return out


# -- dtypes --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_input_on_the_cpu(dtype):
    """Issue 17, 2: ``SyncBatchNorm(4)(paddle.randn([2, 4, 3, 3]).astype('bfloat16'))`` raised a
    bare ``RuntimeError: Unsupported dtype in DLTensor``. As Paddle's 16-bit kernels (GPU):
    float32 parameters and statistics, y and x.grad in the input's dtype, each the float64
    reference of the 16-bit input rounded once."""
    bn = randomize(cbp.SyncBatchNorm(4, momentum=MOMENTUM))
    w, b, rm, rv = (host(t) for t in (bn.weight, bn.bias, bn._mean, bn._variance))
    paddle.seed(1)
    x = (paddle.randn([2, 4, 3, 3]) * 3 + 5).astype(dtype)
    x.stop_gradient = False
    dy = paddle.randn([2, 4, 3, 3]).astype(dtype)
    y = bn(x)
    (y.astype("float32") * dy.astype("float32")).sum().backward()     # Paddle has no CPU 16-bit multiply
    assert y.dtype == x.grad.dtype == getattr(paddle, dtype)
    assert bn._mean.dtype == bn.weight.grad.dtype == paddle.float32
    x64, dy64 = host(x), host(dy)
    y_ref, mean, var = ref.forward(x64, w, b, EPS, "NCHW")
    dx_ref, dw_ref, db_ref = ref.backward(x64, dy64, w, EPS, "NCHW")
    assert within_16bit(host(y), y_ref, dtype, 1e-5)
    assert within_16bit(host(x.grad), dx_ref, dtype, 1e-5)
    # Negative control: a weight off by a few ulps is outside these bounds.
    assert not within_16bit(host(y), ref.forward(x64, w * (1 + 4 * HALF_ULP[dtype]), b, EPS, "NCHW")[0], dtype, 1e-5)
    close(host(bn.weight.grad), dw_ref, 1e-5, 1e-4), close(host(bn.bias.grad), db_ref, 1e-5, 1e-4)
    rm, rv = ref.update_running(rm, rv, mean, var, x64.size // 4, MOMENTUM)
    close(host(bn._mean), rm, 1e-6, 1e-6), close(host(bn._variance), rv, 1e-6, 1e-6)
    bn.eval()
    y = bn(x.detach())
    assert y.dtype == getattr(paddle, dtype)
    assert within_16bit(host(y), ref.eval_forward(x64, w, b, host(bn._mean), host(bn._variance), EPS, "NCHW"),
                        dtype, 1e-5)


def test_bfloat16_channels_last_and_no_grad():
    bn = randomize(cbp.SyncBatchNorm(3, data_format="NLC"))
    w, b = host(bn.weight), host(bn.bias)
    x = paddle.to_tensor(np.random.default_rng(2).normal(-4, 2, size=(5, 7, 3)).astype("float32")).astype("bfloat16")
    with paddle.no_grad():
        y = bn(x)
    assert y.dtype == paddle.bfloat16 and y.stop_gradient
    assert within_16bit(host(y), ref.forward(host(x), w, b, EPS, "NLC")[0], "bfloat16", 1e-5)


@pytest.mark.parametrize("x_dtype,layer_dtype", [("float64", "float32"), ("float32", "float64")])
def test_float32_and_float64_input_must_match_the_layer_as_paddle(x_dtype, layer_dtype):
    """Paddle's batch norms refuse float32 / float64 input in another dtype than their
    parameters (a ValueError, InvalidArgument); so does the drop-in, before any collective and
    with nothing changed."""
    paddle.set_default_dtype(layer_dtype)
    theirs = randomize(paddle.nn.BatchNorm1D(3, momentum=MOMENTUM))
    comm = CountingComm()
    ours = cbp.convert_sync_batchnorm(copy.deepcopy(theirs), comm=comm)
    x = paddle.to_tensor(np.random.default_rng(3).normal(size=(6, 3)).astype(x_dtype))
    with pytest.raises(ValueError):
        theirs(x)
    before = state(ours)
    with pytest.raises(ValueError, match=f"x is paddle.{x_dtype} but this layer's parameters"):
        ours(x)
    after = state(ours)
    assert all(np.array_equal(after[k], before[k]) for k in before) and comm.calls == 0
    close(ours(x.astype(layer_dtype)).numpy(), theirs(x.astype(layer_dtype)).numpy(), 1e-6, 1e-6)   # the control


# -- modes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("use_global_stats,trainable_statistics", [(False, False), (True, False), (False, True),
                                                                   (True, True)])
@pytest.mark.parametrize("training", [True, False])
def test_converted_paddle_batchnorm_modes_as_paddle(use_global_stats, trainable_statistics, training):
    """paddle.nn.BatchNorm's use_global_stats / trainable_statistics and train/eval, converted:
    y, dx and the running statistics as Paddle's own layer over two steps; an all-reduce
    exactly when the batch statistics are used (trainable_statistics syncs in eval too)."""
    paddle.set_default_dtype("float64")
    theirs = randomize(paddle.nn.BatchNorm(3, momentum=MOMENTUM, use_global_stats=use_global_stats,
                                           trainable_statistics=trainable_statistics, dtype="float64"))
    comm = CountingComm()
    ours = cbp.convert_sync_batchnorm(copy.deepcopy(theirs), comm=comm)
    for m in (ours, theirs):
        m.train() if training else m.eval()
    batch = not use_global_stats and (training or trainable_statistics)
    rng = np.random.default_rng(4)
    for step in range(2):
        x, dy = rng.normal(2, 3, size=(4, 3, 2, 2)), rng.normal(size=(4, 3, 2, 2))
        outs = []
        for m in (ours, theirs):
            xt = paddle.to_tensor(x, stop_gradient=False)
            y = m(xt)
            (y * paddle.to_tensor(dy)).sum().backward()
            outs.append((y.numpy(), xt.grad.numpy()))
        close(outs[0][0], outs[1][0])
        if training or not batch:
            close(outs[0][1], outs[1][1])
        else:   # Paddle back-propagates an eval forward as if the running statistics were used
            close(outs[0][1], ref.backward(x, dy, ours.weight.numpy(), EPS, "NCHW")[0], 1e-9, 1e-9)
        close(ours._mean.numpy(), theirs._mean.numpy()), close(ours._variance.numpy(), theirs._variance.numpy())
        if step == 0:
            comm.calls = 0                       # a layer's first training forward may cost more
    assert comm.calls == (2 if batch else 0), comm.calls     # forward and backward of the second step


def test_eval_and_global_stats_make_no_collective():
    comm = CountingComm()
    bn = randomize(cbp.SyncBatchNorm(3, comm=comm))
    x = paddle.to_tensor(np.random.default_rng(5).normal(size=(4, 3, 2, 2)).astype("float32"), stop_gradient=False)
    bn.eval()
    bn(x).sum().backward()
    frozen = cbp.SyncBatchNorm(3, comm=comm, use_global_stats=True)
    frozen(x).sum().backward()
    assert comm.calls == 0
    bn.train()
    bn(x).sum().backward()                     # negative control: training does sync
    assert comm.calls >= 2


def test_one_value_per_channel_in_training_as_paddle_syncbatchnorm():
    """A global batch of one value per channel in training. Paddle's SyncBatchNorm kernel
    (paddle/phi/kernels/gpu/sync_batch_norm_kernel.cu) has no special case: mean = x,
    variance 0, y = bias, and the running statistics move (variance towards 0); its CPU
    BatchNorm*D kernel instead returns x unchanged and leaves them. A drop-in for
    SyncBatchNorm follows SyncBatchNorm (the GPU test checks it against Paddle's own)."""
    bn = randomize(cbp.SyncBatchNorm(3, momentum=MOMENTUM, data_format="NC"))
    w, b, rm, rv = (host(t) for t in (bn.weight, bn.bias, bn._mean, bn._variance))
    x = np.array([[1.0, -2.0, 30.0]])
    xt = paddle.to_tensor(x.astype("float32"), stop_gradient=False)
    y = bn(xt)
    y_ref, mean, var = ref.forward(x, w, b, EPS, "NC")
    close(y_ref, b[None]), close(host(y), y_ref, 1e-6, 1e-6)
    rm, rv = ref.update_running(rm, rv, mean, var, 1, MOMENTUM)
    close(host(bn._mean), rm, 1e-6, 1e-6), close(host(bn._variance), rv, 1e-6, 1e-6)
    y.sum().backward()
    close(host(xt.grad), ref.backward(x, np.ones_like(x), w, EPS, "NC")[0], 1e-6, 1e-6)
    local = paddle.nn.BatchNorm1D(3)                  # Paddle's local layer: the other behaviour
    assert np.array_equal(local(paddle.to_tensor(x.astype("float32"))).numpy(), x.astype("float32"))


# -- errors and state ----------------------------------------------------------------------

def _paddle_error(x):
    """What Paddle's batch norm raises for ``x`` (the functional path of its CPU layers)."""
    with pytest.raises(Exception) as info:
        paddle.nn.functional.batch_norm(x, paddle.zeros([3]), paddle.ones([3]), paddle.ones([3]), paddle.zeros([3]),
                                        training=True)
    return info.type


ERRORS = {
    "channels": (lambda: paddle.zeros([2, 4, 2, 2]), "x has 4 channels on axis 1"),
    "int32": (lambda: paddle.zeros([2, 3, 2, 2], dtype="int32"), "floating dtype"),
    "bool": (lambda: paddle.zeros([2, 3], dtype="bool"), "floating dtype"),
    "6 dims": (lambda: paddle.zeros([2, 3, 1, 1, 1, 1]), "dimensions"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_as_paddle_and_state_unchanged(case):
    """Paddle's exception type for Paddle's error cases (a wrong channel count and too many
    dimensions: ValueError; an integer or bool input: RuntimeError, no kernel), raised before
    any collective with every parameter, statistic and gradient unchanged; the next call works."""
    make, message = ERRORS[case]
    expected = _paddle_error(make())
    assert expected in (ValueError, RuntimeError)
    comm = CountingComm()
    bn = randomize(cbp.SyncBatchNorm(3, comm=comm))
    x = paddle.to_tensor(np.random.default_rng(6).normal(size=(4, 3, 2, 2)).astype("float32"), stop_gradient=False)
    bn(x).sum().backward()
    before, calls = state(bn), comm.calls
    bad = make()
    bad.stop_gradient = not bad.is_floating_point()
    with pytest.raises(expected, match=message) as info:
        bn(bad)
    if expected is RuntimeError:
        assert isinstance(info.value, TypeError)        # cusyncbn's documented TypeError too
    after = state(bn)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert comm.calls == calls
    w, b = host(bn.weight), host(bn.bias)
    close(host(bn(x)), ref.forward(host(x), w, b, EPS, "NCHW")[0], 1e-5, 1e-5)


def test_one_dimension_is_a_value_error():
    """Paddle's SyncBatchNorm kernel: 'The Input dim size should be larger than 1'
    (InvalidArgument, a ValueError in Python)."""
    with pytest.raises(ValueError, match="dimensions"):
        cbp.SyncBatchNorm(3)(paddle.zeros([3]))


# -- warnings ------------------------------------------------------------------------------

def _nan_warnings():
    """Two layers and a deep copy of one fed NaN twice each: the RuntimeWarnings, the layers'
    names, and whether their running means stayed."""
    first = cbp.SyncBatchNorm(3)
    model = cbp.convert_sync_batchnorm(paddle.nn.Sequential(paddle.nn.Identity(), paddle.nn.LayerList(
        [paddle.nn.BatchNorm2D(3)])))
    second = model[1][0]
    first(paddle.ones([2, 3, 1, 1]))
    copied = copy.deepcopy(first)
    nan = paddle.full([2, 3, 1, 1], float("nan"))
    layers = (first, second, copied)
    means = [layer._mean.numpy().copy() for layer in layers]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for layer in layers:
                layer(nan)                                   # the user's line
    caught = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    names = [first.full_name(), second.full_name() + " (1.0)", first.full_name() + "#2"]
    kept = all(np.array_equal(layer._mean.numpy(), mean) for layer, mean in zip(layers, means))
    return caught, names, kept


def test_nonfinite_warns_once_per_layer_naming_it():
    """Each layer fed NaN warns once, naming itself (a converted one with its path in the model;
    a deep copy, e.g. an EMA model, is another layer: it warns for itself); the running
    statistics stay."""
    caught, names, kept = _nan_warnings()
    assert [str(w.message).split(":")[0] for w in caught] == names and kept


def test_nonfinite_warning_points_at_the_users_line():
    """Not into cusyncbn, nor Paddle's Layer.__call__ between the user and the layer."""
    caught, _, _ = _nan_warnings()
    assert caught and all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]


# -- the converter ---------------------------------------------------------------------------

def test_converted_frozen_layer_keeps_use_global_stats():
    """Issue 17, 3, for Paddle's layers: a BatchNorm1D with use_global_stats=True and running
    statistics 0 / 1, converted, then one training forward of x = [[0], [2]]: y = x / sqrt(1 + eps)
    = [0, 1.99999] as Paddle's own layer gives, running_mean still 0."""
    theirs = paddle.nn.BatchNorm1D(1, use_global_stats=True)
    ours = cbp.convert_sync_batchnorm(copy.deepcopy(theirs))
    x = paddle.to_tensor([[0.0], [2.0]])
    y, y_p = ours(x).numpy().ravel(), theirs(x).numpy().ravel()
    close(y, [0.0, 2.0 / np.sqrt(1.0 + EPS)], 1e-6, 1e-6)
    close(y, y_p, 1e-6, 1e-6)
    assert ours._mean.numpy()[0] == 0.0 and ours._variance.numpy()[0] == 1.0
    assert paddle.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(theirs))._use_global_stats is None  # Paddle's drops it


def test_convert_carries_every_attribute_hook_and_buffer():
    paddle.set_default_dtype("float64")
    old = paddle.nn.BatchNorm2D(3, momentum=0.5, epsilon=1e-3, data_format="NHWC", use_global_stats=False,
                                weight_attr=paddle.ParamAttr(learning_rate=0.25), bias_attr=paddle.ParamAttr(
                                    trainable=False), name="frozen_bn")
    randomize(old)
    old.eval()
    old.register_buffer("seen", paddle.zeros([1]))
    old.add_parameter("extra", old.create_parameter([2]))
    old.note = "set by the user"
    calls = []
    pre = old.register_forward_pre_hook(lambda layer, inputs: calls.append("pre"))
    old.register_forward_post_hook(lambda layer, inputs, output: calls.append("post"))
    paddle.set_default_dtype("float32")              # converted under another default dtype
    reference = copy.deepcopy(old)
    new = cbp.convert_sync_batchnorm(old)
    assert type(new) is cbp.SyncBatchNorm and not new.training
    for attr in ("_momentum", "_epsilon", "_data_format", "_use_global_stats", "_name", "_weight_attr", "_bias_attr",
                 "_dtype", "note"):
        assert getattr(new, attr) == getattr(old, attr), attr
    for attr in ("weight", "bias", "_mean", "_variance", "seen", "extra"):
        assert getattr(new, attr) is getattr(old, attr), attr
    assert new._dtype == "float64" and new.bias.stop_gradient and new.weight.optimize_attr["learning_rate"] == 0.25
    assert list(new.state_dict()) == list(old.state_dict())
    x = paddle.to_tensor(np.random.default_rng(7).normal(size=(4, 2, 2, 3)))
    y = new(x)
    assert calls == ["pre", "post"]
    reference._forward_pre_hooks.clear(), reference._forward_post_hooks.clear()
    close(y.numpy(), reference(x).numpy())             # eval with use_global_stats=False: the batch's
    close(new._mean.numpy(), reference._mean.numpy())
    pre.remove()                                       # the handles still reach the hooks
    new(x)
    assert calls == ["pre", "post", "post"]


def test_convert_warns_naming_what_a_subclass_defines():
    class Scaled(paddle.nn.BatchNorm2D):
        factor = 2.0

        def forward(self, x):
            return super().forward(x) * self.factor

    class Plain(paddle.nn.BatchNorm2D):
        def __init__(self, c):
            super().__init__(c, momentum=0.5)

    with pytest.warns(UserWarning, match=r"Scaled.*defines factor, forward") as record:
        new = cbp.convert_sync_batchnorm(paddle.nn.Sequential(Scaled(3)))
    assert record[0].filename == __file__
    assert type(new[0]) is cbp.SyncBatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # an __init__ of its own is instance state: no warning
        plain = cbp.convert_sync_batchnorm(Plain(3))
        cbp.convert_sync_batchnorm(paddle.nn.Sequential(paddle.nn.BatchNorm2D(3), paddle.nn.BatchNorm(3)))
    assert plain._momentum == 0.5


def test_convert_leaves_sync_layers_and_says_so_when_comm_differs():
    comm, other = CountingComm(), CountingComm()
    layer = cbp.SyncBatchNorm(3, comm=comm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cbp.convert_sync_batchnorm(layer) is layer
        assert cbp.convert_sync_batchnorm(layer, comm=comm) is layer
    with pytest.warns(UserWarning, match="keeps its own communicator"):
        assert cbp.convert_sync_batchnorm(paddle.nn.Sequential(layer), comm=other)[0] is layer
    assert layer._comm is comm


def test_convert_paddle_batchnorm_act_and_frozen_parameters():
    old = randomize(paddle.nn.BatchNorm(3, act="relu", param_attr=False, bias_attr=False, dtype="float64",
                                        trainable_statistics=True))
    reference = copy.deepcopy(old)
    new = cbp.convert_sync_batchnorm(old)
    assert new.weight.dtype == new.bias.dtype == paddle.float64 and new.weight.stop_gradient
    assert new._act == "relu" and new._use_global_stats is False
    x = paddle.to_tensor(np.random.default_rng(8).normal(size=(5, 3)))
    close(new(x).numpy(), reference(x).numpy())
    with pytest.raises(ValueError, match="act='nope'"):
        cbp.convert_sync_batchnorm(paddle.nn.BatchNorm(3, act="nope"))


# -- GPU: against Paddle's own SyncBatchNorm kernel --------------------------------------

@pytest.mark.gpu
@pytest.mark.usefixtures("on_gpu")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (1, 4, 1, 1)], ids=["batch", "one value"])
def test_gpu_dtypes_match_paddle_syncbatchnorm(dtype, shape):
    """On a GPU, one process: Paddle's own SyncBatchNorm (its kernel) against ours, 16-bit
    inputs included, and a global batch of one value per channel."""
    theirs = randomize(paddle.nn.SyncBatchNorm(4, momentum=MOMENTUM))
    ours = cbp.convert_sync_batchnorm(copy.deepcopy(theirs))
    rng = np.random.default_rng(9)
    tol = {"bfloat16": 2e-2, "float16": 2e-3, "float32": 1e-5}[dtype]
    for _ in range(2):
        x = paddle.to_tensor(rng.normal(2, 3, size=shape).astype("float32")).astype(dtype)
        dy = paddle.to_tensor(rng.normal(size=shape).astype("float32")).astype(dtype)
        outs = []
        for m in (ours, theirs):
            xt = x.detach()
            xt.stop_gradient = False
            y = m(xt)
            (y * dy).sum().backward()
            outs.append([host(y), host(xt.grad), host(m.weight.grad), host(m.bias.grad), host(m._mean),
                         host(m._variance)])
            m.clear_gradients()
        assert ours(x).dtype == getattr(paddle, dtype)
        for got, want in zip(*outs):
            close(got, want, tol, tol)
