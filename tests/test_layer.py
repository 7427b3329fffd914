"""Single-process behaviour of the layer on the CPU backend, against the float64 reference."""
import subprocess
import sys

import numpy as np
import pytest

import cusyncbn
import reference as ref

SHAPES = {"NC": (6, 3), "NCL": (4, 3, 5), "NCHW": (3, 3, 4, 2), "NCDHW": (2, 3, 2, 3, 2),
          "NLC": (4, 5, 3), "NHWC": (3, 4, 2, 3), "NDHWC": (2, 2, 3, 2, 3)}
TOL = {"float16": dict(rtol=2e-2, atol=1e-2), "float32": dict(rtol=1e-5, atol=1e-4),
       "float64": dict(rtol=1e-10, atol=1e-10)}


def layer(c=3, **kw):
    kw.setdefault("device", "cpu")
    return cusyncbn.SyncBatchNorm(c, **kw)


def test_paddle_worked_example():
    x = np.array([[[[0.3, 0.4], [0.3, 0.07]], [[0.83, 0.37], [0.18, 0.93]]]], dtype="float32")
    y = layer(2)(x)
    expected = [[[[0.26824948, 1.09363246], [0.26824948, -1.63013160]],
                 [[0.80956620, -0.66528702], [-1.27446556, 1.13018656]]]]
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert y.dtype == np.float32 and y.shape == x.shape


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("data_format", list(SHAPES))
def test_training_step_matches_reference(data_format, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=SHAPES[data_format]).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    pdtype = "float64" if dtype == "float64" else "float32"
    bn = layer(data_format=data_format, dtype=pdtype, momentum=0.8)
    w = rng.uniform(0.5, 2, 3).astype(pdtype)
    b = rng.normal(size=3).astype(pdtype)
    bn.weight.data[...] = w
    bn.bias.data[...] = b
    y = bn(x)
    dx = bn.backward(dy)
    y_ref, mean, var = ref.forward(x, w, b, 1e-5, data_format)
    dx_ref, dw, db = ref.backward(x, dy, w, 1e-5, data_format)
    rm, rv = ref.update_running(np.zeros(3), np.ones(3), mean, var, x.size // 3, 0.8)
    np.testing.assert_allclose(y.astype(np.float64), y_ref, **TOL[dtype])
    np.testing.assert_allclose(dx.astype(np.float64), dx_ref, **TOL[dtype])
    np.testing.assert_allclose(bn.weight.grad, dw, rtol=1e-4, atol=1e-3 if dtype == "float16" else 1e-5)
    np.testing.assert_allclose(bn.bias.grad, db, rtol=1e-4, atol=1e-3 if dtype == "float16" else 1e-5)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-5, atol=1e-6)
    assert y.dtype == x.dtype and dx.dtype == x.dtype


def test_non_contiguous_input():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 6, 5, 3))
    x = base[:, ::2, :, :]                            # strided channel axis
    dy = rng.normal(size=(4, 3, 5, 3))
    bn = layer(dtype="float64")
    np.testing.assert_allclose(bn(x), ref.forward(x, np.ones(3), np.zeros(3), 1e-5, "NCHW")[0], atol=1e-10)
    np.testing.assert_allclose(bn.backward(dy.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)),
                               ref.backward(x, dy, np.ones(3), 1e-5, "NCHW")[0], atol=1e-10)


def test_stable_for_large_mean_float32():
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(size=(64, 3, 8, 8))).astype("float32")
    y = layer()(x)
    np.testing.assert_allclose(y, ref.forward(x, np.ones(3), np.zeros(3), 1e-5, "NCHW")[0], atol=1e-3, rtol=0)


def test_eval_uses_running_statistics_and_fixed_gradient():
    rng = np.random.default_rng(3)
    bn = layer(dtype="float64")
    bn._mean[...] = [0.5, -1.0, 2.0]
    bn._variance[...] = [1.5, 0.25, 4.0]
    bn.eval()
    assert not bn.training
    x = rng.normal(size=(5, 3, 2))
    dy = rng.normal(size=x.shape)
    y = bn(x)
    np.testing.assert_allclose(y, ref.eval_forward(x, 1, 0, bn._mean, bn._variance, 1e-5, "NCL"), atol=1e-12)
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, dy / np.sqrt(bn._variance[None, :, None] + 1e-5), atol=1e-12)
    np.testing.assert_allclose(bn._mean, [0.5, -1.0, 2.0])       # eval never updates statistics


def test_empty_batch_and_single_sample():
    bn = layer(data_format="NC")
    bn.bias.data[...] = [1.0, 2.0, 3.0]
    y = bn(np.zeros((0, 3), "float32"))
    assert y.shape == (0, 3)
    assert bn.backward(np.zeros((0, 3), "float32")).shape == (0, 3)
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)
    bn._mean[...] = [5.0, -7.0, 0.1]
    y = bn(np.array([[3.3, -1.7, 12.0]], "float32"))
    np.testing.assert_array_equal(y, [[1.0, 2.0, 3.0]])
    assert np.all(np.isfinite(bn.backward(np.ones((1, 3), "float32"))))


def test_gradients_accumulate_until_cleared():
    rng = np.random.default_rng(4)
    bn = layer(dtype="float64", data_format="NC")
    x, dy = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    bn(x)
    bn.backward(dy)
    first = bn.weight.grad.copy(), bn.bias.grad.copy()
    bn(x)
    bn.backward(dy)
    np.testing.assert_allclose(bn.weight.grad, 2 * first[0])
    np.testing.assert_allclose(bn.bias.grad, 2 * first[1])
    bn.clear_gradients()
    assert bn.weight.grad is None and bn.bias.grad is None


def test_param_attrs():
    bn = layer(weight_attr=cusyncbn.ParamAttr(name="w", initializer=0.5, learning_rate=0.1),
               bias_attr=cusyncbn.ParamAttr(initializer=lambda shape, dtype: np.arange(3, dtype=dtype),
                                            trainable=False))
    assert bn.weight.name == "w" and bn.weight.learning_rate == 0.1
    np.testing.assert_array_equal(bn.weight.data, 0.5)
    np.testing.assert_array_equal(bn.bias.data, [0, 1, 2])
    y = bn(np.ones((2, 3, 2, 2), "float32"))
    bn.backward(np.ones_like(y))
    assert bn.bias.grad is None and bn.weight.grad is not None
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(3.0)[None, :, None, None], y.shape))
    none = layer(weight_attr=False, bias_attr=False)
    assert none.weight is None and none.bias is None and none.parameters() == []
    x = np.random.default_rng(5).normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(none(x), ref.forward(x, 1, 0, 1e-5, "NC")[0], atol=1e-5)
    dy = np.random.default_rng(6).normal(size=x.shape).astype("float32")
    np.testing.assert_allclose(none.backward(dy), ref.backward(x, dy, 1, 1e-5, "NC")[0], rtol=1e-4, atol=1e-4)


def test_lifo_and_no_grad():
    bn = layer(data_format="NC", dtype="float64")
    rng = np.random.default_rng(6)
    xa, xb = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    bn(xa)
    bn(xb)
    with cusyncbn.no_grad():
        bn(xa)
    dy = rng.normal(size=(4, 3))
    np.testing.assert_allclose(bn.backward(dy), ref.backward(xb, dy, 1, 1e-5, "NC")[0], atol=1e-10)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 3\), expected \(5, 3\)"):
        bn.backward(dy)
    dy = rng.normal(size=(5, 3))
    np.testing.assert_allclose(bn.backward(dy), ref.backward(xa, dy, 1, 1e-5, "NC")[0], atol=1e-10)
    with pytest.raises(RuntimeError, match="no pending forward"):
        bn.backward(dy)


@pytest.mark.parametrize("make,x,kind,words", [
    (lambda: layer(), np.zeros((2, 4, 3, 3), "float32"), ValueError, "4 channels"),
    (lambda: layer(data_format="NHWC"), np.zeros((2, 3, 3, 4), "float32"), ValueError, "4 channels on axis 3"),
    (lambda: layer(), np.zeros((3,), "float32"), ValueError, "must have 2 to 5 dimensions"),
    (lambda: layer(), np.zeros((2, 3, 2, 2), "int64"), TypeError, "floating dtype"),
    (lambda: cusyncbn.BatchNorm2D(3, device="cpu"), np.zeros((2, 3), "float32"), ValueError, "4 dimensions"),
    (lambda: layer(), np.zeros((2, 3), "U1"), TypeError, "floating dtype"),       # an array, of the wrong dtype
    (lambda: layer(), "not an array", TypeError, "x must be an array .* got str"),
    (lambda: layer(), b"\x00\x00\x80?", TypeError, "x must be an array .* got bytes"),
    (lambda: layer(), None, TypeError, "x must be an array .* got NoneType"),
    (lambda: layer(), {"x": 1.0}, TypeError, "x must be an array .* got dict"),
    (lambda: layer(), [[1.0, 2.0, 3.0], [4.0]], TypeError, "x must be an array .* got list"),   # ragged
])
def test_bad_input_messages(make, x, kind, words):
    with pytest.raises(kind, match=words):
        make()(x)


def test_numeric_array_likes_are_taken():
    x = [[1.0, 2.0, 3.0], [4.0, 5.0, 7.0], [0.5, -1.0, 2.0]]
    np.testing.assert_allclose(layer()(x), ref.forward(np.asarray(x), 1, 0, 1e-5, "NC")[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,kind,words", [
    (dict(data_format="NCWH"), ValueError, "data_format must be one of"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(weight_attr="ones"), TypeError, "weight_attr"),
    (dict(dtype="float16"), TypeError, "float32 or float64"),
    (dict(comm=42), TypeError, "comm must be"),
    (dict(output="torch"), ValueError, "output must be"),
])
def test_bad_constructor_arguments(kwargs, kind, words):
    with pytest.raises(kind, match=words):
        layer(**kwargs)


def test_bad_num_features_and_device():
    with pytest.raises(ValueError, match="num_features"):
        cusyncbn.SyncBatchNorm(0)
    with pytest.raises(ValueError, match="'cpu', 'gpu' or 'gpu:N'"):
        cusyncbn.set_device("tpu")


def test_state_dict_round_trip_and_atomic_refusal():
    bn = layer()
    bn(np.random.default_rng(7).normal(size=(4, 3)).astype("float32"))
    state = {k: v.copy() for k, v in bn.state_dict().items()}
    assert list(state) == ["weight", "bias", "_mean", "_variance"]
    other = layer()
    other.set_state_dict(state)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    before = {k: v.copy() for k, v in other.state_dict().items()}
    bad = dict(state, _variance=np.ones(4))
    with pytest.raises(ValueError, match=r"shape \(4,\), expected shape \(3,\)"):
        other.set_state_dict(bad)
    with pytest.raises(TypeError, match="floating dtype"):
        other.set_state_dict(dict(state, weight=np.ones(3, dtype=np.int32)))
    with pytest.raises(KeyError, match="unexpected keys"):
        other.set_state_dict(dict(state, extra=np.ones(3)))
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_local_batchnorms_and_conversion():
    class Net:
        def __init__(self):
            self.blocks = [cusyncbn.BatchNorm2D(3, device="cpu"), {"bn": cusyncbn.BatchNorm1D(3, device="cpu")}]
            self.pair = (cusyncbn.BatchNorm3D(3, device="cpu"), 7)
            self.head = cusyncbn.BatchNorm1D(3, data_format="NC", device="cpu")

    net = Net()
    weights = [net.blocks[0].weight, net.blocks[1]["bn"].weight, net.pair[0].weight, net.head.weight]
    means = [net.blocks[0]._mean, net.blocks[1]["bn"]._mean, net.pair[0]._mean, net.head._mean]
    out = cusyncbn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert out is net
    converted = [net.blocks[0], net.blocks[1]["bn"], net.pair[0], net.head]
    assert all(type(l) is cusyncbn.SyncBatchNorm for l in converted)
    assert all(l.weight is w and l._mean is m for l, w, m in zip(converted, weights, means))
    assert net.pair[1] == 7 and net.head._data_format == "NC"
    single = cusyncbn.SyncBatchNorm.convert_sync_batchnorm(cusyncbn.BatchNorm2D(4, device="cpu"))
    assert isinstance(single, cusyncbn.SyncBatchNorm)
    single(np.ones((2, 4), "float32"))                # now accepts 2-D to 5-D input


def test_use_global_stats():
    bn = cusyncbn.BatchNorm1D(3, use_global_stats=True, device="cpu", data_format="NC")
    x = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], "float32")
    np.testing.assert_allclose(bn(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_use_global_stats_false_in_eval_uses_and_updates_batch_statistics():
    """Paddle's rule: use_global_stats=False normalizes with the batch statistics and moves
    the running ones, in eval mode too (checked against paddle.nn.BatchNorm2D itself in
    tests/test_paddle.py for cusyncbn.paddle)."""
    bn = cusyncbn.BatchNorm1D(3, use_global_stats=False, device="cpu", data_format="NC", momentum=0.6).eval()
    x = np.random.default_rng(9).normal(2.0, 3.0, size=(7, 3))
    y = bn(x.astype("float32"))
    y_ref, mean, var = ref.forward(x, 1.0, 0.0, 1e-5, "NC")
    rm, rv = ref.update_running(np.zeros(3), np.ones(3), mean, var, 7, 0.6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-5)


def test_import_is_lazy():
    code = ("import sys, cusyncbn; heavy = [m for m in ('mpi4py', 'cupy', 'torch', 'jax') if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names():
    assert set(cusyncbn.__all__) <= set(dir(cusyncbn)) | {"NCCLComm"}
    assert cusyncbn.SingleProcessComm().size == 1
    assert isinstance(cusyncbn.SingleProcessComm(), cusyncbn.Communicator)


def test_discoverable_api_signature_repr_and_errors():
    import inspect
    params = inspect.signature(cusyncbn.SyncBatchNorm).parameters
    for option in ("comm", "dtype", "debug", "device", "output", "unbiased_running_var", "nonfinite", "act"):
        assert params[option].kind is inspect.Parameter.KEYWORD_ONLY, option
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    bn = layer(name="bn1", bias_attr=False)
    assert repr(bn) == ("SyncBatchNorm(num_features=3, momentum=0.9, epsilon=1e-05, data_format='NCHW', "
                        "name='bn1', weight=True, bias=False, device='cpu')")
    assert (bn.momentum, bn.epsilon, bn.name, bn.data_format) == (0.9, 1e-05, "bn1", "NCHW")
    with pytest.raises(AttributeError):
        bn.momentum = 0.5                                    # read-only
    with pytest.raises(TypeError, match=r"^SyncBatchNorm: momentum .* None"):
        layer(momentum=None)
    with pytest.raises(ValueError, match=r"^SyncBatchNorm: epsilon must be a finite"):
        layer(epsilon=float("nan"))
    with pytest.raises(ValueError, match=r"^BatchNorm2D: epsilon must be a finite"):
        cusyncbn.BatchNorm2D(3, epsilon=float("inf"), device="cpu")
    with pytest.raises(TypeError, match=r"^SyncBatchNorm: debug must be True or False"):
        layer(debug="yes")
    with pytest.raises(ValueError, match=r"^SyncBatchNorm: num_features"):
        layer(0)
    import pathlib
    assert (pathlib.Path(cusyncbn.__file__).parent / "py.typed").exists()


def test_convert_builds_fresh_layers_and_walks_children_only():
    class Holder:                                      # an arbitrary object: never entered
        def __init__(self):
            self.bn = cusyncbn.BatchNorm1D(3, device="cpu")

    class Net:
        def __init__(self):
            self.blocks = [cusyncbn.BatchNorm2D(3, device="cpu", momentum=0.8, epsilon=1e-3, name="b0")]
            self.head = cusyncbn.BatchNorm1D(3, device="cpu", data_format="NC", use_global_stats=True)
            self.holder = Holder()

    net = Net()
    old = net.blocks[0]
    old.eval()
    converted = cusyncbn.SyncBatchNorm.convert_sync_batchnorm(net)
    new = converted.blocks[0]
    assert converted is net and type(new) is cusyncbn.SyncBatchNorm and new is not old
    assert (new.momentum, new.epsilon, new.name, new.data_format, new.training) == (0.8, 1e-3, "b0", "NCHW", False)
    assert new.weight is old.weight and new.running_mean is old.running_mean
    assert type(net.head) is cusyncbn.SyncBatchNorm
    assert type(net.holder.bn) is cusyncbn.BatchNorm1D


def test_device_of_names_devices_as_device_does():
    class Producer:
        def __init__(self, kind, index):
            self.where = (kind, index)

        def __dlpack_device__(self):
            return self.where
    assert cusyncbn.device_of(np.zeros(2)) == "cpu"
    assert cusyncbn.device_of(Producer(3, 0)) == "cpu"                  # CUDA-pinned host memory
    assert [cusyncbn.device_of(Producer(kind, 1)) for kind in (2, 13)] == ["gpu:1", "gpu:1"]
    assert cusyncbn.device_of(Producer(10, 0)) == "DLPack device type 10:0"      # ROCm: not a cusyncbn device
    with pytest.raises(TypeError, match="device_of needs an array .* got list"):
        cusyncbn.device_of([1.0, 2.0])
    x = np.random.default_rng(8).normal(size=(4, 3)).astype("float32")
    bn = cusyncbn.SyncBatchNorm(3, data_format="NC", device=cusyncbn.device_of(x))
    np.testing.assert_allclose(bn(x), ref.forward(x, 1, 0, 1e-5, "NC")[0], rtol=1e-5, atol=1e-5)


def test_parse_device_resolves_every_spelling_and_names_what_it_got(monkeypatch):
    from cusyncbn import _device
    assert _device.parse_device(" CPU ") == "cpu"
    monkeypatch.setattr(_device, "gpu_count", lambda: 2)
    monkeypatch.setattr(_device, "node_local_rank", lambda: 3)
    assert [_device.parse_device(d) for d in ("gpu", "cuda", "gpu:1", "CUDA:0")] == ["gpu:1", "gpu:1", "gpu:1",
                                                                                     "gpu:0"]
    with pytest.raises(RuntimeError, match=r"device 'gpu:2': only 2 CUDA device\(s\) are usable"):
        _device.parse_device("gpu:2")
    with pytest.raises(ValueError, match=r"'cpu', 'gpu' or 'gpu:N', got 'gpu:x'"):
        _device.parse_device("gpu:x")
    with pytest.raises(TypeError, match="device must be a string .* got int"):
        _device.parse_device(0)
    monkeypatch.setattr(_device, "gpu_count", lambda: 0)
    with pytest.raises(RuntimeError, match="device 'gpu': no usable CUDA device"):
        _device.parse_device("gpu")
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        cusyncbn.SyncBatchNorm(3, device="gpu")              # the layer resolves its device with it


GOOD_OPTIONS = dict(num_features=3, momentum=0.9, epsilon=1e-5, data_format="NC", dtype="float32", output="backend",
                    use_global_stats=None, unbiased_running_var=False, debug=False, nonfinite="warn")


@pytest.mark.parametrize("change,kind,message", [
    (dict(num_features=True), ValueError, "num_features must be a positive int, got True"),
    (dict(num_features=3.0), ValueError, "num_features must be a positive int, got 3.0"),
    (dict(data_format="NHWC"), ValueError, r"data_format must be one of \['NC', 'NCL'\], got 'NHWC'"),
    (dict(momentum=None), TypeError, "momentum must be a float in \\[0, 1\\], got None \\(Paddle's"),
    (dict(momentum="0.9"), TypeError, "momentum must be a float in \\[0, 1\\], got '0.9'"),
    (dict(momentum=-0.1), ValueError, "momentum must be in \\[0, 1\\], got -0.1"),
    (dict(epsilon=-1.0), ValueError, "epsilon must be a finite float >= 0, got -1.0"),
    (dict(dtype="float16"), TypeError, "dtype .* must be float32 or float64, got 'float16'"),
    (dict(output="torch"), ValueError, r"output must be one of \('backend', 'input'\), got 'torch'"),
    (dict(use_global_stats=1), TypeError, "use_global_stats must be True or False, got 1"),
    (dict(unbiased_running_var="no"), TypeError, "unbiased_running_var must be True or False, got 'no'"),
    (dict(debug=0), TypeError, "debug must be True or False, got 0"),
    (dict(nonfinite="ignore"), ValueError, "nonfinite must be 'warn' or 'raise', got 'ignore'"),
    (dict(act="gelu"), ValueError, r"act must be None or 'relu' \(the fused epilogue's activations\), got 'gelu'; "
                                   "apply other activations as layers of their own"),
    (dict(act=True), ValueError, "act must be None or 'relu' .* got True"),
])
def test_check_layer_options_names_the_layer_the_option_and_the_value(change, kind, message):
    from cusyncbn._options import check_layer_options
    with pytest.raises(kind, match=f"^BatchNorm1D: {message}"):
        check_layer_options("BatchNorm1D", ("NC", "NCL"), **{**GOOD_OPTIONS, **change})


def test_check_layer_options_returns_the_options_as_a_layer_keeps_them(monkeypatch):
    from cusyncbn._options import LayerOptions, check_layer_options, check_output
    got = check_layer_options("SyncBatchNorm", ("NC",), **{**GOOD_OPTIONS, "num_features": np.int64(3),
                                                           "momentum": 1, "epsilon": np.float32(0.5),
                                                           "dtype": np.float64, "unbiased_running_var": np.bool_(1),
                                                           "use_global_stats": False})
    assert got == LayerOptions(3, 1.0, 0.5, "NC", np.dtype("float64"), "backend", False, True, False, "warn", None)
    assert check_layer_options("SyncBatchNorm", ("NC",), **{**GOOD_OPTIONS, "act": "relu"}).act == "relu"
    assert [type(v) for v in got[:3]] == [int, float, float] and type(got.unbiased_running_var) is bool
    for value, expected in (("1", True), (" Yes ", True), ("0", False), ("false", False), ("", False)):
        monkeypatch.setenv("CUSYNCBN_DEBUG", value)
        assert check_layer_options("SyncBatchNorm", ("NC",), **{**GOOD_OPTIONS, "debug": None}).debug is expected
        assert layer(data_format="NC")._debug is expected                   # the layer's default is this one
    assert check_output("input", "bn") == "input"
    with pytest.raises(ValueError, match=r"^bn: output must be one of"):
        check_output(None, "bn")
    bn = layer(data_format="NC", name="bn7")
    with pytest.raises(ValueError, match=r"^bn7: output must be one of .* got 'numpy'"):
        bn(np.ones((2, 3), np.float32), output="numpy")                  # a call's output, checked the same way


@pytest.mark.parametrize("module", ["cusyncbn._options", "cusyncbn._device", "cusyncbn._pending",
                                    "cusyncbn._checkpoint"])
def test_docstring_examples_of_the_layers_helpers_run(module):
    import doctest
    import importlib
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_a_layer_without_comm_starts_mpi_and_the_failure_hooks_when_launched_by_mpi(monkeypatch):
    """Under ``mpiexec -n 2`` a rank failing between building a layer and its first forward
    must end the job: building the layer starts MPI and installs the hooks
    (``_comm_factory.start_launched_mpi``; the job itself: test_failures.py, "before_first")."""
    import types
    from cusyncbn import _abort, _comm_factory
    installed = []
    fake = types.ModuleType("mpi4py")
    fake.MPI = types.ModuleType("mpi4py.MPI")
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake.MPI)
    monkeypatch.setattr(_abort, "install", lambda: installed.append(True))
    monkeypatch.setattr(_comm_factory, "launched_size", lambda: 1)
    assert _comm_factory.start_launched_mpi() is False and installed == []
    layer()
    assert installed == []                                  # one process: nothing to end
    monkeypatch.setattr(_comm_factory, "launched_size", lambda: 2)
    assert _comm_factory.start_launched_mpi() is True and installed == [True]
    layer()
    assert installed == [True, True]
    layer(comm=cusyncbn.SingleProcessComm())                   # a comm given: built (and hooked) by it
    cusyncbn.BatchNorm2D(3, device="cpu")                      # local layers make no collective
    assert installed == [True, True]


@pytest.mark.parametrize("kwargs,kind,message", [
    (dict(weight_attr="ones"), TypeError, "^SyncBatchNorm: weight_attr must be None, False or a cusyncbn.ParamAttr, "
                                          "got str$"),
    (dict(bias_attr=1.0), TypeError, "^SyncBatchNorm: bias_attr must be None, False or a cusyncbn.ParamAttr, "
                                     "got float$"),
    (dict(momentum=1.5), ValueError, "^SyncBatchNorm: momentum must be in"),
])
def test_bad_options_raise_before_mpi_is_started(monkeypatch, kwargs, kind, message):
    """Under ``mpiexec`` a bad option must not start MPI nor install the failure hooks first:
    every option is checked (``_options``) before the layer calls ``start_launched_mpi``."""
    from cusyncbn import _layer
    started = []
    monkeypatch.setattr(_layer, "start_launched_mpi", lambda: started.append(True))
    with pytest.raises(kind, match=message):
        cusyncbn.SyncBatchNorm(3, **kwargs)
    assert started == []
    cusyncbn.SyncBatchNorm(3, weight_attr=False, bias_attr=cusyncbn.ParamAttr(initializer=0.5))
    assert started == [True]                                # the recorder sees a good layer's start


def test_local_layers_refuse_a_comm_and_initializers_of_another_shape():
    with pytest.raises(TypeError, match="^BatchNorm1D is not synchronized and takes no comm; use SyncBatchNorm or "
                                        "convert_sync_batchnorm$"):
        cusyncbn.BatchNorm1D(3, comm=cusyncbn.SingleProcessComm())
    with pytest.raises(ValueError, match=r"^BatchNorm1D: weight initializer returned shape \(4,\), expected \(3,\)$"):
        cusyncbn.BatchNorm1D(3, weight_attr=cusyncbn.ParamAttr(initializer=lambda shape, dtype: np.ones(4, dtype)))


class _VotingComm:
    """Rank 0 of 2 whose all-reduces are kept (the other rank adds nothing: a zero row)."""

    rank, size = 0, 2

    def __init__(self):
        self.buffers = []

    def allreduce(self, buf):
        self.buffers.append(np.array(buf, copy=True))


def test_raise_no_pending_forward_votes_as_a_backward_before_raising():
    from cusyncbn import _comm
    from cusyncbn._pending import raise_no_pending_forward
    message = r"^bn5: backward\(\) called with no pending forward"
    with pytest.raises(RuntimeError, match=message):
        raise_no_pending_forward("bn5")                               # no vote
    comm = _VotingComm()
    with pytest.raises(RuntimeError, match=message):
        raise_no_pending_forward("bn5", cusyncbn.SingleProcessComm(), 3, "float32")   # nobody to tell
    tag = _comm.peek_tag(comm) + 1
    with pytest.raises(RuntimeError, match=message):
        raise_no_pending_forward("bn5", comm, 3, "float64")
    assert len(comm.buffers) == 1
    # The debug table (``_debug``): failed here, then the row of a training backward of 3
    # float64 channels on the next collective number; the other rank's row is its own.
    np.testing.assert_array_equal(comm.buffers[0], [1, tag, 1, 3, 2, 1] + [0] * 6)


@pytest.mark.parametrize("debug,training,votes", [(True, True, 1), (True, False, 0), (False, True, 0)])
def test_a_layers_backward_with_no_pending_forward_votes_only_when_its_next_pass_would(debug, training, votes):
    comm = _VotingComm()
    bn = layer(4, comm=comm, debug=debug, data_format="NC", name="bn6")
    bn.train() if training else bn.eval()
    with pytest.raises(RuntimeError, match=r"^bn6: backward\(\) called with no pending forward"):
        bn.backward(np.ones((2, 4), np.float32))
    assert len(comm.buffers) == votes
    with pytest.raises(RuntimeError, match="no pending forward"):
        cusyncbn.BatchNorm1D(4, device="cpu", debug=True).backward(np.ones((2, 4), np.float32))


def test_the_entry_points_document_shapes_arguments_returns_and_errors():
    import inspect
    assert "\n    Shape:\n        - x: ``(N, C)``" in cusyncbn.SyncBatchNorm.__doc__
    for entry, sections in ((cusyncbn.SyncBatchNorm.forward, ("Args:", "Returns:", "Raises:")),
                            (cusyncbn.SyncBatchNorm.backward, ("Args:", "Returns:", "Raises:")),
                            (cusyncbn.export_state_dict, ("Args:", "Returns:", "Raises:", "Example:")),
                            (cusyncbn.save_checkpoint, ("Args:", "Raises:", "Example:"))):
        doc = inspect.getdoc(entry)
        assert all(f"\n{section}\n" in doc for section in sections), (entry.__qualname__, sections)


def test_check_ndim_holds_a_local_layer_to_its_own_ranks_of_input():
    from cusyncbn._rules import check_ndim
    check_ndim(np.zeros((2, 3, 4, 4)), (4,), "NCHW", "bn")
    check_ndim([[1.0, 2.0]], (4,), "NCHW", "bn")                      # no shape: the pass names it
    with pytest.raises(ValueError, match=r"^bn: x must have 2 or 3 dimensions for data_format 'NCL', got shape "
                                         r"\(2, 3, 4, 4\)$"):
        check_ndim(np.zeros((2, 3, 4, 4)), (2, 3), "NCL", "bn")
    with pytest.raises(ValueError, match=r"^batch_norm_x: x must have 5 dimensions for data_format 'NDHWC'"):
        cusyncbn.BatchNorm3D(3, data_format="NDHWC", device="cpu", name="batch_norm_x")(np.zeros((2, 3, 4, 3)))
