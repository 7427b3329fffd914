"""cusyncbn.paddle against Paddle itself and the float64 reference (CPU here; GPU variants
are marked), conversion, checkpoints, and the multi-rank cases of tests/paddle_worker.py
(one mpiexec launch per rank count runs them all: importing Paddle is slow)."""
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import warnings
from unittest import mock

import numpy as np
import pytest

import cusyncbn
import reference as ref
from test_mpi import mpiexec

paddle = pytest.importorskip("paddle")
import cusyncbn.paddle as cbp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 300
MOMENTUM = 0.75                 # exact in float32: Paddle keeps momentum as a float32 attribute
FORMATS = [(paddle.nn.BatchNorm1D, "NC", (6, 3)), (paddle.nn.BatchNorm1D, "NCL", (6, 3, 5)),
           (paddle.nn.BatchNorm1D, "NLC", (6, 5, 3)), (paddle.nn.BatchNorm2D, "NCHW", (5, 3, 4, 2)),
           (paddle.nn.BatchNorm2D, "NHWC", (5, 4, 2, 3)), (paddle.nn.BatchNorm3D, "NCDHW", (4, 3, 2, 3, 2)),
           (paddle.nn.BatchNorm3D, "NDHWC", (4, 2, 3, 2, 3))]


@contextlib.contextmanager
def paddle_defaults(dtype):
    """Paddle's default dtype set to ``dtype`` (restored after), and its BatchNorm*D's notice
    about tracking running statistics silenced."""
    old = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="When training, we now always track")
            yield
    finally:
        paddle.set_default_dtype(old)


@pytest.fixture(autouse=True)
def float64_and_quiet():
    with paddle_defaults("float64"):
        yield


def randomize(bn, seed=0):
    rng = np.random.default_rng(seed)
    c = bn._mean.shape[0]
    for t, values in ((bn.weight, rng.uniform(0.5, 1.5, c)), (bn.bias, rng.normal(size=c)),
                      (bn._mean, rng.normal(size=c)), (bn._variance, rng.uniform(0.5, 2.0, c))):
        if t is not None:
            t.set_value(paddle.to_tensor(values, dtype=t.dtype))
    return bn


def step(model, x, dy):
    """Forward + backward of sum(y * dy); returns y, x.grad and the parameter gradients."""
    xt = paddle.to_tensor(x, stop_gradient=False)
    y = model(xt)
    (y * paddle.to_tensor(dy)).sum().backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return y.numpy(), xt.grad.numpy(), grads


def close(got, want, tol=1e-10):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls,data_format,shape", FORMATS, ids=[f for _, f, _ in FORMATS])
def test_matches_paddle_batchnorm_and_reference(cls, data_format, shape):
    theirs = randomize(cls(3, momentum=MOMENTUM, data_format=data_format))
    ours = cbp.convert_sync_batchnorm(copy.deepcopy(theirs))
    assert type(ours) is cbp.SyncBatchNorm and ours._data_format == data_format
    rng = np.random.default_rng(1)
    rm, rv = theirs._mean.numpy(), theirs._variance.numpy()
    for _ in range(3):
        x, dy = rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape)
        w = ours.weight.numpy()
        (y, dx, grads), (y_p, dx_p, grads_p) = step(ours, x, dy), step(theirs, x, dy)
        close(y, y_p), close(dx, dx_p)
        assert grads.keys() == grads_p.keys() == {"weight", "bias"}
        for name in grads:
            close(grads[name], grads_p[name])
        close(ours._mean.numpy(), theirs._mean.numpy()), close(ours._variance.numpy(), theirs._variance.numpy())
        y_ref, mean, var = ref.forward(x, w, ours.bias.numpy(), 1e-5, data_format)
        dx_ref, dw_ref, db_ref = ref.backward(x, dy, w, 1e-5, data_format)
        rm, rv = ref.update_running(rm, rv, mean, var, x.size // 3, MOMENTUM)
        close(y, y_ref, 1e-9), close(dx, dx_ref, 1e-9), close(grads["weight"], dw_ref, 1e-9)
        close(grads["bias"], db_ref, 1e-9), close(ours._mean.numpy(), rm), close(ours._variance.numpy(), rv)
    ours.eval(), theirs.eval()
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    for got, want in zip(step(ours, x, dy)[:2], step(theirs, x, dy)[:2]):
        close(got, want)


def test_float32_matches_paddle():
    paddle.set_default_dtype("float32")
    theirs = randomize(paddle.nn.BatchNorm2D(4, momentum=MOMENTUM, data_format="NHWC"))
    ours = cbp.convert_sync_batchnorm(copy.deepcopy(theirs))
    rng = np.random.default_rng(2)
    x, dy = rng.normal(3, 2, size=(6, 5, 3, 4)).astype("float32"), rng.normal(size=(6, 5, 3, 4)).astype("float32")
    (y, dx, g), (y_p, dx_p, g_p) = step(ours, x, dy), step(theirs, x, dy)
    assert y.dtype == dx.dtype == np.float32 and ours._mean.dtype == paddle.float32
    for a, b in [(y, y_p), (dx, dx_p), (g["weight"], g_p["weight"]), (g["bias"], g_p["bias"]),
                 (ours._variance.numpy(), theirs._variance.numpy())]:
        close(a, b, 1e-4)
    half, dy_half = x.astype("float16"), dy.astype("float16")    # statistics in float32, y and dx in float16
    xt = paddle.to_tensor(half, stop_gradient=False)
    y = ours(xt)
    (y.astype("float32") * paddle.to_tensor(dy_half.astype("float32"))).sum().backward()   # no CPU float16 multiply
    assert y.dtype == xt.grad.dtype == paddle.float16
    w, b = ours.weight.numpy(), ours.bias.numpy()
    close(y.numpy(), ref.forward(half, w, b, 1e-5, "NHWC")[0], 1e-2)
    close(xt.grad.numpy(), ref.backward(half, dy_half, w, 1e-5, "NHWC")[0], 1e-2)


@pytest.mark.parametrize("use_global_stats", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_use_global_stats_as_paddle(use_global_stats, training):
    theirs = randomize(paddle.nn.BatchNorm2D(3, momentum=MOMENTUM, use_global_stats=use_global_stats))
    ours = cbp.SyncBatchNorm(3, momentum=MOMENTUM, use_global_stats=use_global_stats)
    ours.set_state_dict(theirs.state_dict())
    for m in (ours, theirs):
        m.train() if training else m.eval()
    rng = np.random.default_rng(3)
    x, dy = rng.normal(2, 1, size=(4, 3, 2, 3)), rng.normal(size=(4, 3, 2, 3))
    (y, dx, _), (y_p, dx_p, _) = step(ours, x, dy), step(theirs, x, dy)
    close(y, y_p)
    if training or use_global_stats:
        close(dx, dx_p)
    else:
        # Paddle normalizes with the batch statistics here but back-propagates as if the
        # running ones had been used; ours is the gradient of the forward actually computed.
        close(dx, ref.backward(x, dy, ours.weight.numpy(), 1e-5, "NCHW")[0], 1e-9)
    # False updates the running statistics even in eval, as Paddle's kernel does.
    close(ours._mean.numpy(), theirs._mean.numpy()), close(ours._variance.numpy(), theirs._variance.numpy())
    assert f"use_global_stats={use_global_stats}" in repr(ours)


def test_parameters_state_dict_keys_and_attrs_as_paddle_syncbatchnorm():
    for kwargs in ({}, {"weight_attr": False, "bias_attr": False}, {"bias_attr": False}):
        theirs, ours = paddle.nn.SyncBatchNorm(5, **kwargs), cbp.SyncBatchNorm(5, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict()), kwargs
        assert [p.stop_gradient for p in ours.parameters()] == [p.stop_gradient for p in theirs.parameters()]
        assert isinstance(ours, paddle.nn.SyncBatchNorm)
    frozen = cbp.SyncBatchNorm(3, weight_attr=False, bias_attr=False, data_format="NCL")
    x = np.random.default_rng(4).normal(size=(4, 3, 5))
    y, dx, grads = step(frozen, x, np.ones_like(x))
    assert grads == {} and frozen.weight.stop_gradient
    close(y, ref.forward(x, np.ones(3), np.zeros(3), 1e-5, "NCL")[0], 1e-9)
    no_weight = cbp.SyncBatchNorm(3, weight_attr=False, data_format="NCL")
    dy = np.random.default_rng(5).normal(size=x.shape)
    y, dx, grads = step(no_weight, x, dy)
    assert list(grads) == ["bias"]
    close(grads["bias"], ref.backward(x, dy, np.ones(3), 1e-5, "NCL")[2], 1e-9)
    close(dx, ref.backward(x, dy, np.ones(3), 1e-5, "NCL")[0], 1e-9)
    init = cbp.SyncBatchNorm(3, weight_attr=paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(2.0)),
                             bias_attr=paddle.ParamAttr(learning_rate=0.5))
    close(init.weight.numpy(), 2.0)
    assert init.bias.optimize_attr["learning_rate"] == 0.5
    assert (init._momentum, init._epsilon, init._data_format) == (0.9, 1e-5, "NCHW")


def test_running_statistics_updated_in_the_paddle_buffers():
    """Zero-copy: the forward writes the running statistics through DLPack into the
    tensors the layer holds (same objects, same memory, new values)."""
    bn = cbp.SyncBatchNorm(3, momentum=0.5)
    mean, var = bn._mean, bn._variance
    ptrs = (mean.data_ptr(), var.data_ptr())
    x = np.random.default_rng(5).normal(4.0, 2.0, size=(8, 3, 2, 2))
    bn(paddle.to_tensor(x))
    assert bn._mean is mean and bn._variance is var and (mean.data_ptr(), var.data_ptr()) == ptrs
    _, batch_mean, batch_var = ref.forward(x, np.ones(3), np.zeros(3), 1e-5, "NCHW")
    close(mean.numpy(), 0.5 * batch_mean), close(var.numpy(), 0.5 + 0.5 * batch_var)


class MirrorComm:
    """Two identical ranks in one process (the all-reduce doubles the payload); counts calls."""
    rank, size = 0, 2

    def __init__(self):
        self.calls = 0

    def allreduce(self, buf):
        self.calls += 1
        buf *= 2


def test_no_grad_and_frozen_input_paths():
    comm = MirrorComm()
    bn = cbp.SyncBatchNorm(3, comm=comm, data_format="NLC")
    x = paddle.to_tensor(np.random.default_rng(6).normal(size=(4, 5, 3)))
    with paddle.no_grad():
        bn(x)                                      # a layer's first training forward may cost more
        comm.calls = 0
        y = bn(x)
    assert y.stop_gradient and comm.calls == 1
    bn(x).sum().backward()                         # x needs no gradient: no backward all-reduce
    assert comm.calls == 2 and bn.weight.grad is not None
    close(bn.bias.grad.numpy(), 20.0)              # this rank's share: 4 * 5 elements of dy = 1
    for p in bn.parameters():
        p.stop_gradient = True
    y = bn(x)
    assert y.stop_gradient and comm.calls == 3


def test_empty_batch_leaves_running_statistics_and_matches_paddle():
    theirs = randomize(paddle.nn.BatchNorm2D(3, momentum=MOMENTUM))
    ours = cbp.convert_sync_batchnorm(copy.deepcopy(theirs))
    x = np.zeros((0, 3, 2, 2))
    (y, dx, g), (y_p, dx_p, g_p) = step(ours, x, x), step(theirs, x, x)
    assert y.shape == dx.shape == y_p.shape == dx_p.shape == (0, 3, 2, 2)
    close(g["bias"], g_p["bias"])
    close(ours._mean.numpy(), theirs._mean.numpy()), close(ours._variance.numpy(), theirs._variance.numpy())


def test_errors_before_any_collective():
    with pytest.raises(ValueError, match="data_format must be one of"):
        cbp.SyncBatchNorm(3, data_format="NWC")
    comm = MirrorComm()
    bn = cbp.SyncBatchNorm(3, comm=comm)
    with pytest.raises(ValueError, match="expected num_features=3"):
        bn(paddle.zeros([2, 4, 2, 2]))
    with pytest.raises(ValueError, match="dimensions"):
        bn(paddle.zeros([2, 3, 1, 1, 1, 1]))
    with pytest.raises(TypeError, match="floating dtype"):
        bn(paddle.zeros([2, 3], dtype="int32"))
    with pytest.raises(TypeError, match="paddle.Tensor"):
        bn(np.zeros((2, 3)))
    assert comm.calls == 0
    with pytest.raises(TypeError, match="use_global_stats must be None, True or False"):
        cbp.SyncBatchNorm(3, use_global_stats=1)
    with pytest.raises(ValueError, match="act='nope'"):
        cbp.convert_sync_batchnorm(paddle.nn.BatchNorm(3, act="nope"))
    paddle.enable_static()
    try:
        with paddle.static.program_guard(paddle.static.Program()):
            with pytest.raises(RuntimeError, match="dynamic-graph mode only"):
                cbp.SyncBatchNorm(3)(paddle.static.data("x", [4, 3], "float32"))
    finally:
        paddle.disable_static()


def test_convert_every_kind_keeps_tensors_modes_and_outputs():
    shared = paddle.nn.BatchNorm1D(4, momentum=MOMENTUM, data_format="NC")
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.BatchNorm(4, act="relu", momentum=MOMENTUM, param_attr=False, dtype="float64"),
        paddle.nn.Flatten(2), paddle.nn.LayerList([paddle.nn.BatchNorm1D(4, weight_attr=False)]),
        paddle.nn.Flatten(), paddle.nn.Linear(36, 4), shared, paddle.nn.Linear(4, 4), shared)
    model[3][0].eval()                             # converted layers keep their mode
    for m in model.sublayers():
        if hasattr(m, "_variance"):
            randomize(m, seed=len(m.full_name()))
    original = copy.deepcopy(model)
    olds = [model[1], model[3][0], model[6]]
    converted = cbp.SyncBatchNorm.convert_sync_batchnorm(model)
    news = [model[1], model[3][0], model[6]]
    assert converted is model and all(type(n) is cbp.SyncBatchNorm for n in news)
    assert model[8] is model[6]                    # a shared layer stays shared, converted once
    for old, new in zip(olds, news):
        assert new._mean is old._mean and new._variance is old._variance and new.training == old.training
        for attr in ("weight", "bias"):
            assert getattr(old, attr) is None or getattr(new, attr) is getattr(old, attr)
    assert model[1].weight.stop_gradient and model[1]._act == "relu" and model[3][0].weight.stop_gradient

    def run(m, x):
        h = m[5](m[4](m[3][0](m[2](m[1](m[0](x))))))
        return m[8](m[7](m[6](h)))
    x = np.random.default_rng(7).normal(size=(5, 3, 3, 3))
    for _ in range(2):
        outs = []
        for m in (model, original):
            xt = paddle.to_tensor(x, stop_gradient=False)
            y = run(m, xt)
            y.square().sum().backward()
            outs.append({"y": y.numpy(), "x.grad": xt.grad.numpy(),
                         **{n: p.grad.numpy() for n, p in m.named_parameters() if p.grad is not None}})
            m.clear_gradients()
        # Paddle computes no gradient for the bias of a batch norm without weight; cusyncbn does.
        assert set(outs[0]) - set(outs[1]) == {"1.bias", "3.0.bias"} and len(outs[1]) == 10
        for name, want in outs[1].items():
            close(outs[0][name], want, 1e-9)
    ours = model.state_dict()
    assert set(ours) - set(original.state_dict()) == {"1.weight", "3.0.weight"}      # frozen ones, as Paddle's
    for name, value in original.state_dict().items():
        close(ours[name].numpy(), value.numpy(), 1e-9)


def test_convert_maps_statistics_modes_and_paddle_syncbatchnorm():
    for use_global, trainable, expected in ((True, False, True), (False, True, False), (False, False, None)):
        old = paddle.nn.BatchNorm(3, use_global_stats=use_global, trainable_statistics=trainable,
                                  dtype="float32", param_attr=False)
        new = cbp.convert_sync_batchnorm(old)
        assert new._use_global_stats is expected
        assert new.weight.dtype == paddle.float32 and new._mean is old._mean
        x = paddle.to_tensor(np.random.default_rng(8).normal(size=(4, 3)).astype("float32"))
        close(new(x).numpy(), old(x).numpy(), 1e-5)
    assert cbp.convert_sync_batchnorm(paddle.nn.BatchNorm3D(2, use_global_stats=True))._use_global_stats is True
    theirs = paddle.nn.SyncBatchNorm(2, momentum=0.5, epsilon=1e-3, data_format="NLC", name="sbn")
    ours = cbp.convert_sync_batchnorm(theirs)
    assert type(ours) is cbp.SyncBatchNorm and ours.weight is theirs.weight and ours._variance is theirs._variance
    assert (ours._momentum, ours._epsilon, ours._data_format, ours._name) == (0.5, 1e-3, "NLC", "sbn")
    assert cbp.convert_sync_batchnorm(ours) is ours


def test_checkpoints_from_paddle_state_dicts():
    theirs = randomize(paddle.nn.BatchNorm2D(4, momentum=MOMENTUM))
    theirs(paddle.to_tensor(np.random.default_rng(9).normal(size=(6, 4, 3, 3))))
    state = theirs.state_dict()
    ours = cbp.SyncBatchNorm(4)
    ours.set_state_dict(state)
    core = cusyncbn.SyncBatchNorm(4, device="cpu", dtype="float64")
    cusyncbn.load_state_dict(core, state)
    theirs.eval(), ours.eval(), core.eval()
    x = np.random.default_rng(10).normal(size=(3, 4, 2, 2))
    want = theirs(paddle.to_tensor(x)).numpy()
    close(ours(paddle.to_tensor(x)).numpy(), want)
    close(core(x), want)
    assert list(ours.state_dict()) == list(state)


def test_allreduce_gradients_single_process_and_bad_op():
    bn = cbp.SyncBatchNorm(3)
    x = paddle.to_tensor(np.random.default_rng(11).normal(size=(4, 3)))
    bn(x).sum().backward()
    before = bn.bias.grad.numpy()
    cbp.allreduce_gradients(bn.parameters(), op="mean")
    close(bn.bias.grad.numpy(), before)
    with pytest.raises(ValueError, match="op must be"):
        cbp.allreduce_gradients(bn.parameters(), op="max")


def test_import_cusyncbn_does_not_import_paddle():
    code = "import sys, cusyncbn, cusyncbn.functional; assert 'paddle' not in sys.modules, 'paddle imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- multi-rank ---------------------------------------------------------------------------

_SOURCE = open(os.path.join(HERE, "paddle_worker.py")).read()
CASES = re.findall(r"^@case\ndef (\w+)", _SOURCE, re.M)
_results: dict = {}


def test_the_pylayer_takes_tensors_and_settings_never_the_layer():
    """As torch's ``_functions.SyncBatchNorm``: the layer's state is read before the call and
    the PyLayer computes from what it is given."""
    comm = MirrorComm()
    bn = cbp.SyncBatchNorm(3, momentum=MOMENTUM, epsilon=1e-3, comm=comm, data_format="NC", name="bn_pl")
    x = paddle.to_tensor(np.random.default_rng(7).normal(size=(4, 3)), stop_gradient=False)
    with mock.patch.object(cbp._Function, "apply", wraps=cbp._Function.apply) as apply:
        y = bn(x)
    call, = apply.call_args_list
    x_in, weight, bias, residual, arrays, settings = call.args
    assert x_in is x and weight is bn.weight and bias is bn.bias and residual is None
    assert [type(a) for a in arrays] == [np.ndarray] * 4
    assert arrays[0].ctypes.data == bn._mean.data_ptr()             # the running mean itself, no copy
    assert type(settings) is cbp._Settings                     # read by name: a swap of two fields shows
    assert settings == cbp._Settings(training=True, momentum=MOMENTUM, epsilon=1e-3, data_format="NC", comm=comm,
                                     num_features=3, device="cpu", where="bn_pl", stats_dtype=paddle.float64,
                                     activation=None)
    assert not any(isinstance(v, paddle.nn.Layer) for v in (*call.args, *settings))
    forward = comm.calls
    y.sum().backward()
    assert comm.calls == forward + 1 and x.grad is not None
    with pytest.raises(ValueError, match=r"^bn_pl: x is paddle.float32 but this layer's parameters .* are "
                                         r"paddle.float64"):
        bn(paddle.to_tensor(np.ones((4, 3), np.float32)))        # checked from the settings, in the PyLayer
    assert comm.calls == forward + 1


def test_one_external_stream_per_cuda_stream_shared_by_the_adapters(monkeypatch):
    """``_streams.external_stream``: one CuPy wrapper per (device, stream), the same for the
    torch and the Paddle adapter (a stand-in CuPy and stand-in current streams: no GPU)."""
    import types
    from cusyncbn import _streams
    torch = pytest.importorskip("torch")     # imported before CuPy is stood in for (torch's import inspects modules)
    import cusyncbn.torch as cbt
    made = []

    class ExternalStream:
        def __init__(self, ptr, index):
            made.append((index, ptr))
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(ExternalStream=ExternalStream))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    _streams.external_stream.cache_clear()
    try:
        first = _streams.external_stream(0, 1234)
        assert _streams.external_stream(0, 1234) is first and made == [(0, 1234)]
        assert _streams.external_stream(1, 1234) is not first and made == [(0, 1234), (1, 1234)]
        stream = types.SimpleNamespace(cuda_stream=1234)
        monkeypatch.setattr(paddle.device.cuda, "current_stream", lambda index: stream)
        assert cbp._on_paddle_stream("gpu:0") is first
        monkeypatch.setattr(torch.cuda, "current_stream", lambda index: stream)
        cuda_tensor = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda", index=0))
        assert cbt._on_torch_stream(cuda_tensor) is first and len(made) == 2
        for i in range(70):                              # bounded: the oldest go
            _streams.external_stream(0, 10_000 + i)
        assert _streams.external_stream.cache_info().currsize == 64
    finally:
        _streams.external_stream.cache_clear()


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def _launch(args: list, n: int) -> subprocess.CompletedProcess:
    launcher = mpiexec()
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
    extra = ["--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    return subprocess.run([launcher, "-n", str(n), *extra, sys.executable, *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=_env(), cwd=ROOT)


def worker_results(n: int) -> dict:
    """Every case of paddle_worker.py under ``mpiexec -n n``, launched once per n."""
    if n not in _results:
        proc = _launch(["-m", "mpi4py", os.path.join(HERE, "paddle_worker.py"), *CASES], n)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, (f"mpiexec -n {n} paddle_worker.py exited {proc.returncode}\n"
                                                f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
        _results[n] = json.loads(lines[-1][len("RESULT "):])
    return _results[n]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_multi_rank(case, n):
    result = worker_results(n)
    assert result["size"] == n
    assert result["cases"][case] == [], "\n".join(result["cases"][case])


@pytest.mark.slow
def test_example_paddle_convert():
    """The example against one process on the whole batch, uneven per-rank batches; its
    control (local BatchNorm2D per rank) must fail the same comparison."""
    proc = _launch(["examples/paddle_convert.py", "--steps", "10"], 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": OK" in proc.stdout and "2 rank(s)" in proc.stdout and "per-rank batch [10, 20]" in proc.stdout
    # No warning but Paddle's own at import where ccache is missing (any Paddle script's).
    warned = [line for line in (proc.stdout + proc.stderr).splitlines() if "Warning" in line]
    assert all("No ccache found" in line for line in warned), warned
    control = _launch(["examples/paddle_convert.py", "--steps", "3", "--no-convert"], 2)
    assert control.returncode == 1 and ": MISMATCH" in control.stdout, control.stdout + control.stderr


# -- GPU (Paddle built with CUDA, and CuPy) ------------------------------------------------

def _paddle_gpu() -> None:
    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        pytest.skip("Paddle is not built with CUDA or sees no GPU")


@pytest.fixture
def on_gpu():
    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        pytest.skip("Paddle is not built with CUDA or sees no GPU")
    old = paddle.get_device()
    paddle.set_device("gpu:0")
    yield
    paddle.set_device(old)


@pytest.mark.gpu
@pytest.mark.parametrize("data_format,dtype", [("NCHW", "float32"), ("NHWC", "float32"), ("NCHW", "float64")])
def test_gpu_tensors_through_dlpack(on_gpu, data_format, dtype):
    """Paddle GPU tensors through DLPack into the CUDA kernels, on Paddle's stream, against
    Paddle's own BatchNorm2D; the running statistics stay in the same GPU buffers."""
    paddle.set_default_dtype(dtype)
    theirs = randomize(paddle.nn.BatchNorm2D(5, momentum=MOMENTUM, data_format=data_format))
    ours = cbp.convert_sync_batchnorm(copy.deepcopy(theirs))
    ptr = ours._mean.data_ptr()
    rng = np.random.default_rng(12)
    shape = (6, 5, 7, 3) if data_format == "NCHW" else (6, 7, 3, 5)
    tol = 1e-9 if dtype == "float64" else 1e-4
    for _ in range(2):
        x, dy = rng.normal(2, 3, size=shape).astype(dtype), rng.normal(size=shape).astype(dtype)
        (y, dx, g), (y_p, dx_p, g_p) = step(ours, x, dy), step(theirs, x, dy)
        for a, b in [(y, y_p), (dx, dx_p), (g["weight"], g_p["weight"]), (g["bias"], g_p["bias"]),
                     (ours._mean.numpy(), theirs._mean.numpy()), (ours._variance.numpy(), theirs._variance.numpy())]:
            close(a, b, tol)
    assert ours._mean.place.is_gpu_place() and ours._mean.data_ptr() == ptr
