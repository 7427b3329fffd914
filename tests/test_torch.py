"""cusyncbn.torch against torch itself (CPU here; GPU variants are marked), and checkpoints."""
import copy
from unittest import mock

import numpy as np
import pytest

import cusyncbn

torch = pytest.importorskip("torch")
import cusyncbn.torch as cbt  # noqa: E402
from cusyncbn._backend_factory import get_backend  # noqa: E402
from comms import CountingComm  # noqa: E402


def make_model(dim=2, momentum=0.1, affine=True, track=True):
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dim]
    bn = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dim]
    return torch.nn.Sequential(conv(3, 6, 3, padding=1), bn(6, momentum=momentum, affine=affine,
                                                             track_running_stats=track),
                               torch.nn.ReLU(), conv(6, 4, 1), bn(4, momentum=None))


def train_pair(dim, steps=3, channels_last=False, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    ref = make_model(dim, **kw).to(dtype)
    ours = cbt.convert_sync_batchnorm(copy.deepcopy(ref))
    assert sum(isinstance(m, cbt.SyncBatchNorm) for m in ours.modules()) == 2
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]
    shape = (5, 3) + (6,) * dim
    for step in range(steps):
        x = torch.randn(shape, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last if dim == 2 else torch.channels_last_3d)
        outs = []
        for model, opt in zip((ref, ours), opts):
            opt.zero_grad()
            xx = x.clone().requires_grad_()
            y = model(xx)
            (y.square() * torch.linspace(0, 1, y.numel(), dtype=dtype).reshape(y.shape)).sum().backward()
            opt.step()
            outs.append((y.detach(), xx.grad))
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outs[1][0], outs[0][0], **tol)
        torch.testing.assert_close(outs[1][1], outs[0][1], **tol)
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, **tol, msg=name)
    for (name, a), b in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(b, a, **tol, msg=name)
    return ref, ours


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_converted_model_matches_torch_batchnorm(dim):
    train_pair(dim)


def test_channels_last_float32():
    # One step: over several SGD steps float32 rounding flips ReLU kinks and the runs drift apart.
    train_pair(2, steps=1, channels_last=True, dtype=torch.float32)
    train_pair(3, steps=1, channels_last=True, dtype=torch.float32)
    train_pair(2, channels_last=True)


def test_no_affine_no_running_stats_and_eval():
    ref, ours = train_pair(2, affine=False, track=False)
    ref.eval(), ours.eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


def test_batchnorm1d_on_2d_input_and_eval():
    torch.manual_seed(1)
    ref = torch.nn.BatchNorm1d(5).double()
    ours = cbt.convert_sync_batchnorm(copy.deepcopy(ref))
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x))
    assert int(ours.num_batches_tracked) == 1


def test_conversion_shares_parameters_and_buffers():
    model = make_model(2)
    bn = model[1]
    converted = cbt.convert_sync_batchnorm(model)
    assert converted[1].weight is bn.weight and converted[1].running_mean is bn.running_mean


def test_checkpoint_round_trips_and_cross_framework():
    bn = cusyncbn.SyncBatchNorm(4, device="cpu", momentum=0.5)
    bn(np.random.default_rng(0).normal(3, 2, size=(8, 4)).astype("float32"))
    torch_bn = torch.nn.BatchNorm1d(4)
    torch_bn.load_state_dict(cusyncbn.export_state_dict(bn, "torch"))
    torch.testing.assert_close(torch_bn.running_mean.numpy(), bn.running_mean)
    other = cusyncbn.SyncBatchNorm(4, device="cpu")
    cusyncbn.load_state_dict(other, torch_bn.state_dict())
    np.testing.assert_array_equal(other.running_var, bn.running_var)
    paddle_style = {"weight": np.full(4, 2.0), "bias": np.zeros(4), "_mean": np.ones(4), "_variance": np.ones(4)}
    cusyncbn.load_state_dict(other, paddle_style)
    np.testing.assert_array_equal(other.weight.data, 2.0)
    with pytest.raises(ValueError, match="expected shape \\(4,\\)"):
        cusyncbn.load_state_dict(other, dict(torch_bn.state_dict(), running_var=torch.ones(5)))
    np.testing.assert_array_equal(other.weight.data, 2.0)       # unchanged by the failed load


def test_npz_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "bn.npz"
    layers = {"a": cusyncbn.SyncBatchNorm(3, device="cpu"), "b": cusyncbn.BatchNorm1D(2, device="cpu")}
    layers["a"]._mean[...] = [1, 2, 3]
    cusyncbn.save_checkpoint(layers, path)
    fresh = {"a": cusyncbn.SyncBatchNorm(3, device="cpu"), "b": cusyncbn.BatchNorm1D(2, device="cpu")}
    cusyncbn.load_checkpoint(fresh, path)
    np.testing.assert_array_equal(fresh["a"].running_mean, [1, 2, 3])

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", crash)
    layers["a"]._mean[...] = 9
    with pytest.raises(OSError, match="disk full"):
        cusyncbn.save_checkpoint(layers, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["bn.npz"]      # old file intact, no temp left
    cusyncbn.load_checkpoint(fresh, path)
    np.testing.assert_array_equal(fresh["a"].running_mean, [1, 2, 3])
    wrong = {"a": cusyncbn.SyncBatchNorm(4, device="cpu"), "b": cusyncbn.BatchNorm1D(2, device="cpu")}
    with pytest.raises(ValueError, match="expected shape \\(4,\\)"):
        cusyncbn.load_checkpoint(wrong, path)
    np.testing.assert_array_equal(wrong["b"].running_mean, 0.0)


def test_dlpack_round_trip_torch_and_output_like_input():
    bn = cusyncbn.SyncBatchNorm(3, device="cpu", output="input")
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    y = bn(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    dx = bn.backward(torch.ones_like(y))
    assert isinstance(dx, torch.Tensor)
    y_np = bn(x.numpy(), output="backend")
    assert isinstance(y_np, np.ndarray)
    np.testing.assert_allclose(y_np, y.numpy())
    x_shared = x.numpy()
    assert np.shares_memory(get_backend(bn.device).import_array(x, "x"), x_shared)     # zero-copy import


def test_jax_dlpack_round_trip():
    jnp = pytest.importorskip("jax.numpy")
    bn = cusyncbn.SyncBatchNorm(3, device="cpu", output="input", data_format="NLC")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)).astype("float32"))
    y = bn(x)
    assert type(y).__module__.startswith("jax")
    ref = cusyncbn.SyncBatchNorm(3, device="cpu", data_format="NLC")(np.asarray(x))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-6)
    dx = bn.backward(jnp.ones_like(y))
    assert type(dx).__module__.startswith("jax") and dx.shape == x.shape


def test_wrong_device_is_an_error_not_a_copy():
    class FakeCuda:
        def __dlpack_device__(self):
            return (2, 0)
    with pytest.raises(ValueError, match="lives on gpu:0 but this layer is on the CPU"):
        cusyncbn.SyncBatchNorm(3, device="cpu")(FakeCuda())


def test_torch_parity_convert_signature_and_classmethod():
    import inspect
    params = list(inspect.signature(cbt.convert_sync_batchnorm).parameters.values())
    assert [p.name for p in params[:2]] == ["module", "process_group"]
    assert params[2].name == "comm" and params[2].kind is inspect.Parameter.KEYWORD_ONLY
    model = make_model(2)
    converted = cbt.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, cbt.SyncBatchNorm) for m in converted.modules()) == 2


class TwinComm(CountingComm):
    """Two ranks holding the same batch, in one process: the all-reduce doubles the sums
    (torch syncs only over more than one process, and so does the module)."""

    def __init__(self):
        super().__init__()
        self.size = 2

    def allreduce(self, buf):
        super().allreduce(buf)
        buf *= 2


def test_backward_skips_dx_and_collective_when_input_needs_no_gradient():
    comm = TwinComm()
    bn = cbt.SyncBatchNorm(3, comm=comm).double()
    x = torch.randn(6, 3, 4, dtype=torch.float64)              # requires_grad False
    bn(x)                                                       # a layer's first call may cost more
    comm.calls = 0
    bn(x).square().sum().backward()
    assert comm.calls == 1                                      # the forward's only
    ref = torch.nn.BatchNorm1d(3).double()
    ref(x).square().sum().backward()
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad)
    xg = x.clone().requires_grad_()
    bn(xg).square().sum().backward()
    assert comm.calls == 3 and xg.grad is not None             # forward + backward with dx


def test_parameter_views_are_imported_once():
    bn = cbt.SyncBatchNorm(3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    bn(x)
    views = {k: v[2] for k, v in bn._views.items()}
    bn(x)
    assert all(bn._views[k][2] is v for k, v in views.items()) and len(views) == 4
    bn.weight = torch.nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))   # a new tensor: re-imported
    y = bn(x)
    assert bn._views["weight"][2] is not views["weight"]
    torch.testing.assert_close(y.std(dim=0, unbiased=False), torch.full((3,), 2.0, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)


def test_torch_dist_comm_on_gloo_is_watched(tmp_path):
    """TorchDistComm over a CPU (gloo) group: all-reduces through the watched wait, in a
    process of its own (torch.distributed state stays out of pytest's)."""
    import subprocess
    import sys
    script = tmp_path / "gloo.py"
    script.write_text(
        "import numpy as np, torch.distributed as dist, cusyncbn\n"
        "from cusyncbn import _watchdog\n"
        "from cusyncbn.torch import TorchDistComm\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'rendezvous'}', rank=0, world_size=1)\n"
        "waits = []\n"
        "original = _watchdog.wait\n"
        "_watchdog.wait = lambda *a, **k: waits.append(1) or original(*a, **k)\n"
        "comm = TorchDistComm(timeout=30)\n"
        "bn = cusyncbn.SyncBatchNorm(3, comm=comm, device='cpu', data_format='NC')\n"
        "x = np.arange(12, dtype=np.float32).reshape(4, 3)\n"
        "y = bn(x); bn.backward(np.ones_like(y))\n"
        "waits.clear()                       # steady state: a layer's first call may cost more\n"
        "y = bn(x); bn.backward(np.ones_like(y))\n"
        "print('ok', len(waits), np.allclose(y.mean(axis=0), 0, atol=1e-6))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "2", "True"], done.stdout


def test_the_autograd_function_takes_tensors_and_settings_never_the_module():
    """As torch's ``_functions.SyncBatchNorm``: the module's state is read before the call
    and the function computes from what it is given (a module in its arguments would let
    it reach back into the module)."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm1d(3, eps=1e-3, dtype=torch.float64)
    bn = cbt.convert_sync_batchnorm(copy.deepcopy(ref))
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    with mock.patch.object(cbt._Function, "apply", wraps=cbt._Function.apply) as apply:
        y = bn(x)
    call, = apply.call_args_list
    x_in, weight, bias, z, arrays, settings = call.args
    assert weight is bn.weight and bias is bn.bias and x_in.shape == x.shape and z is None
    assert [type(a) for a in arrays] == [np.ndarray] * 4
    assert np.shares_memory(arrays[0], bn.running_mean.numpy())
    assert np.shares_memory(arrays[2], bn.weight.detach().numpy())
    assert type(settings) is cbt._Settings                     # read by name: a swap of two fields shows
    assert settings._replace(comm=None, name=None) == cbt._Settings(
        training=True, momentum=0.9, epsilon=1e-3, data_format="NCL", comm=None, plan_device="cpu", name=None,
        activation=None)
    assert settings.comm.size == 1 and settings.name.startswith("SyncBatchNorm#")
    assert not any(isinstance(v, torch.nn.Module) for v in (*call.args, *arrays, *settings))
    y.sum().backward()
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_the_no_grad_path_runs_the_same_core_call(monkeypatch):
    calls = []
    core = cbt._core_forward

    def recording_core(x, z, arrays, settings):
        calls.append(settings)
        return core(x, z, arrays, settings)
    monkeypatch.setattr(cbt, "_core_forward", recording_core)
    bn = cbt.SyncBatchNorm(3, dtype=torch.float64).eval()
    with torch.no_grad():
        bn(torch.randn(4, 3, dtype=torch.float64))
    assert [(s.training, s.momentum, s.epsilon, s.data_format) for s in calls] == [(False, 0.9, 1e-5, "NC")]


def test_the_module_forward_documents_its_argument_result_and_errors():
    import inspect
    doc = inspect.getdoc(cbt.SyncBatchNorm.forward)
    assert all(f"\n{section}\n" in doc for section in ("Args:", "Returns:", "Raises (before any state change or "
                                                                               "collective):"))
    assert "InputChannelsError" in doc and "InputDtypeError" in doc
