"""cusyncbn.torch.SyncBatchNorm is a torch batch norm (issue 17, sections 1 and 3).

torch's own modules are the reference for behaviour (``torch.nn.BatchNorm*d`` on one
process with the whole batch makes the decisions ``torch.nn.SyncBatchNorm`` makes without
a process group); the float64 reference of ``tests/reference.py`` is the oracle for the
numbers of 16-bit inputs. The multi-rank cases are in ``tests/torch_worker.py``, run
under ``mpiexec`` from here.
"""
import copy
import inspect
import io
import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

import cusyncbn
import reference as ref

torch = pytest.importorskip("torch")
import cusyncbn.torch as cbt  # noqa: E402
from test_mpi import TIMEOUT_S, mpiexec  # noqa: E402
from test_torch import TwinComm  # noqa: E402  (two ranks with the same batch, in one process)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_BatchNorm = torch.nn.modules.batchnorm._BatchNorm
HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state(module, saved, exact=True):
    """``module``'s state is ``saved``: bit for bit, or (not ``exact``) to rounding."""
    now = module.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        if exact or not v.is_floating_point():
            assert torch.equal(now[k], v), k
        else:
            torch.testing.assert_close(now[k], v, msg=k)


# -- it is a torch batch norm ----------------------------------------------------------------

def test_isinstance_of_torch_batch_norms():
    bn = cbt.SyncBatchNorm(1)
    assert isinstance(bn, _BatchNorm) and isinstance(bn, torch.nn.SyncBatchNorm)
    assert not isinstance(cusyncbn.SyncBatchNorm(1, device="cpu"), _BatchNorm)     # the check can fail


def freeze_norms(model):
    """The ``norm_eval`` pattern of detection toolboxes: every batch norm in eval mode."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


@pytest.mark.parametrize("freeze", [True, False])
def test_norm_eval_pattern_freezes_converted_layers_as_torchs(freeze):
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).double()
    ours = cbt.convert_sync_batchnorm(copy.deepcopy(theirs))
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64) + 2
    for model in (theirs, ours):
        model.train()
        if freeze:
            freeze_norms(model)
        model(x).sum().backward()
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean, rtol=0, atol=1e-12)
    assert ours[1].training is theirs[1].training is not freeze
    moved = float(ours[1].running_mean.abs().max())
    assert (moved == 0.0) is freeze                        # the control: unfrozen, the statistics move


def test_state_dict_keys_versions_and_old_checkpoints():
    theirs, ours = torch.nn.BatchNorm2d(4), cbt.SyncBatchNorm(4)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"] == 2
    ours(torch.randn(3, 4, 2, 2)), theirs(torch.randn(3, 4, 2, 2))
    old = torch.nn.BatchNorm2d(4).state_dict()               # a version-1 checkpoint: no num_batches_tracked
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    for module in (theirs, ours):
        module.load_state_dict(copy.deepcopy(old))
    assert_state(ours, state(theirs))
    old._metadata[""]["version"] = 2                          # control: a current version must have the key
    for module in (theirs, ours):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            module.load_state_dict(copy.deepcopy(old))
    ours.load_state_dict(cusyncbn.export_state_dict(_cusyncbn_layer(), "torch"))
    torch.testing.assert_close(ours.running_mean, torch.full((4,), 0.25))


def _cusyncbn_layer():
    layer = cusyncbn.SyncBatchNorm(4, device="cpu")
    layer._mean[...] = 0.25
    return layer


def test_repr_is_torchs_with_the_backend():
    theirs = torch.nn.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=False)
    ours = cbt.SyncBatchNorm(5, eps=1e-3, momentum=None, affine=False)
    assert repr(ours) == repr(theirs)[:-1] + ", backend=cusyncbn)"


def test_hooks_run_as_on_torchs():
    calls = {"ours": [], "theirs": []}

    def hooks(module, who):
        module.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        module.register_forward_hook(lambda m, args, out: calls[who].append(("forward", out.detach().clone())))
        module.register_full_backward_hook(lambda m, gin, gout: calls[who].append(("backward", gin[0].clone())))
        module.register_state_dict_pre_hook(lambda m, prefix, keep_vars: calls[who].append(("state_dict", prefix)))
    theirs, ours = torch.nn.BatchNorm1d(3).double(), cbt.SyncBatchNorm(3).double()
    hooks(theirs, "theirs"), hooks(ours, "ours")
    x = torch.randn(6, 3, dtype=torch.float64) * 3 + 1
    for module in (theirs, ours):
        xx = x.clone().requires_grad_()
        (module(xx) * torch.arange(18.0, dtype=torch.float64).view(6, 3)).sum().backward()
        module.state_dict()
    assert [c[0] for c in calls["ours"]] == ["forward", "backward", "state_dict"] == [c[0] for c in calls["theirs"]]
    for a, b in zip(calls["ours"][:2], calls["theirs"][:2]):
        torch.testing.assert_close(a[1], b[1])


# -- every mode makes torch's decisions ----------------------------------------------------

CONFIGS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
           dict(momentum=None, affine=False, track_running_stats=False), dict(eps=1e-3, momentum=0.3)]
if HAS_BIAS_ARG:
    CONFIGS.append(dict(bias=False))

# What the sequence does before each step, on both modules: attributes set at any time are
# read by the next call, as torch's module reads them.
SEQUENCE = [lambda m: m.train(), lambda m: None, lambda m: m.eval(), lambda m: m.train(),
            lambda m: setattr(m, "momentum", None), lambda m: setattr(m, "eps", 1e-2),
            lambda m: setattr(m, "track_running_stats", False), lambda m: m.eval(),
            lambda m: setattr(m, "track_running_stats", True), lambda m: m.train()]


def run_sequence(module, device="cpu"):
    """(name, tensor) of every output, input gradient, parameter gradient and state after
    each step of SEQUENCE, on data with a far-off mean."""
    gen = torch.Generator().manual_seed(0)
    record = []
    for i, before in enumerate(SEQUENCE):
        before(module)
        x = (torch.randn(5, 4, 3, 2, generator=gen, dtype=torch.float64) * 2 + 3).to(device).requires_grad_()
        dy = torch.randn(5, 4, 3, 2, generator=gen, dtype=torch.float64).to(device)
        module.zero_grad()
        try:
            y = module(x)
        except Exception as exc:                              # torch's error cases: the same error
            record.append((f"step {i} error", f"{type(exc).__name__}: {exc}"))
            continue
        (y * dy).sum().backward()
        record += [(f"step {i} y", y.detach()), (f"step {i} dx", x.grad)]
        record += [(f"step {i} {n}.grad", p.grad) for n, p in module.named_parameters()]
        record += [(f"step {i} {n}", t.clone()) for n, t in module.state_dict().items()]
    return record


def assert_same_record(ours, theirs):
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (name, a), (_, b) in zip(ours, theirs):
        if isinstance(b, str):
            assert a == b, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_every_mode_matches_torch(config):
    theirs = torch.nn.SyncBatchNorm(4, **config).double()     # without torch.distributed: one process
    ours = cbt.SyncBatchNorm(4, **config).double()
    with torch.no_grad():
        for module in (theirs, ours):
            if module.weight is not None:
                module.weight.copy_(torch.linspace(0.5, 2, 4))
            if module.bias is not None:
                module.bias.copy_(torch.linspace(-1, 1, 4))
    assert_same_record(run_sequence(ours), run_sequence(theirs))


def test_mode_comparison_can_fail():
    theirs = torch.nn.SyncBatchNorm(4).double()
    ours = cbt.SyncBatchNorm(4, momentum=0.2).double()            # one decision differs: caught
    with pytest.raises(AssertionError, match="running_mean"):
        assert_same_record(run_sequence(ours), run_sequence(theirs))


def test_eval_without_running_stats_uses_the_batch_and_makes_no_collective():
    comm = TwinComm()                                         # two "ranks": a training forward syncs
    bn = cbt.SyncBatchNorm(1, track_running_stats=False, comm=comm).double()
    x = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    bn.eval()
    torch.testing.assert_close(bn(x), torch.tensor([[-1.0], [1.0]], dtype=torch.float64), rtol=0, atol=1e-5)
    assert comm.calls == 0
    bn.train()
    bn(x)
    assert comm.calls >= 1                                    # control: training does sync


def test_no_sync_over_one_process_and_sync_false():
    comm = TwinComm()
    bn = cbt.SyncBatchNorm(2, comm=comm, sync=False)
    bn(torch.randn(4, 2))
    assert comm.calls == 0
    bn.sync = True                                            # read at call time
    bn(torch.randn(4, 2))
    assert comm.calls >= 1


def test_higher_rank_input_as_torch():
    theirs, ours = torch.nn.SyncBatchNorm(3).double(), cbt.SyncBatchNorm(3).double()
    x = torch.randn(4, 3, 2, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    assert_state(ours, state(theirs), exact=False)


# -- dtypes ------------------------------------------------------------------------------------

LOW = [torch.bfloat16, torch.float16]


def low_tolerance(dtype):
    return 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10     # two ulps of the 16-bit format


def reference_pass(x, dy, weight, bias, eps=1e-5):
    """float64 y, dx, dweight, dbias, mean, unbiased var of the 16-bit values of x."""
    xd, dyd = x.detach().double().numpy(), dy.double().numpy()
    w, b = weight.detach().double().numpy(), bias.detach().double().numpy()
    y, mean, var = ref.forward(xd, w, b, eps, "NCHW")
    dx, dw, db = ref.backward(xd, dyd, w, eps, "NCHW")
    n = xd.size // xd.shape[1]
    return y, dx, dw, db, mean, var * n / (n - 1)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_16_bit_input_on_the_cpu(dtype):
    """The listed input (bfloat16, mean 5) and its backward, against the float64 reference:
    within the input format's rounding, as torch's own module is."""
    torch.manual_seed(0)
    x = (torch.randn(8, 4, 3, 3) + 5).to(dtype).requires_grad_()
    dy = torch.randn(8, 4, 3, 3).to(dtype)
    bn = cbt.SyncBatchNorm(4)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, 4))
    y = bn(x)
    y.backward(dy)
    assert y.dtype == x.grad.dtype == dtype and bn.weight.grad.dtype == torch.float32
    want_y, want_dx, want_dw, want_db, mean, var = reference_pass(x, dy, bn.weight, bn.bias)
    tol = low_tolerance(dtype)
    np.testing.assert_allclose(y.detach().double().numpy(), want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(x.grad.double().numpy(), want_dx, rtol=tol, atol=tol * np.abs(want_dx).max())
    np.testing.assert_allclose(bn.weight.grad.double().numpy(), want_dw, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(bn.bias.grad.double().numpy(), want_db, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(bn.running_mean.double().numpy(), 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var.double().numpy(), 0.9 + 0.1 * var, rtol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    theirs = torch.nn.BatchNorm2d(4)                          # torch's own: no closer to the reference
    with torch.no_grad():
        theirs.weight.copy_(bn.weight)
    their_error = np.abs(theirs(x.detach()).detach().double().numpy() - want_y).max()
    assert np.abs(y.detach().double().numpy() - want_y).max() <= their_error + tol


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_16_bit_parameters_and_buffers_on_the_cpu(dtype):
    """A module converted to 16 bits (``module.to(bfloat16)``), as torch's takes it: outputs
    and gradients in that dtype, running statistics updated in it."""
    torch.manual_seed(1)
    theirs = torch.nn.BatchNorm2d(4).to(dtype)
    ours = cbt.SyncBatchNorm(4).to(dtype)
    x = (torch.randn(6, 4, 3, 3) * 2 - 3).to(dtype)
    dy = torch.randn(6, 4, 3, 3).to(dtype)
    outs = []
    for module in (theirs, ours):
        xx = x.clone().requires_grad_()
        y = module(xx)
        y.backward(dy)
        outs.append((y, xx.grad, module.weight.grad, module.bias.grad, module.running_mean, module.running_var))
    tol = low_tolerance(dtype)
    for name, a, b in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), *outs):
        assert a.dtype == b.dtype == dtype, name
        scale = float(b.detach().double().abs().max())
        torch.testing.assert_close(a.double(), b.double(), rtol=2 * tol, atol=2 * tol * scale, msg=name)
    want_y = reference_pass(x, dy, ours.weight, ours.bias)[0]
    np.testing.assert_allclose(outs[1][0].detach().double().numpy(), want_y, rtol=tol, atol=tol)


def test_16_bit_module_with_float32_input_keeps_the_input_dtype():
    ours, theirs = cbt.SyncBatchNorm(3).bfloat16(), torch.nn.BatchNorm1d(3).bfloat16()
    x = torch.randn(5, 3)
    try:
        want = theirs(x).dtype
    except RuntimeError:                                      # torch may refuse the mix: then any is fine
        want = None
    got = ours(x).dtype
    assert want is None or got == want


# -- errors: torch's, with no state changed ----------------------------------------------------

def torch_error(module, x):
    with pytest.raises(Exception) as caught:
        module(x)
    return caught.value


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1), (1, 4, 1, 1, 1)])
def test_one_value_per_channel_in_training_is_torchs_error(shape):
    x = torch.randn(shape)
    want = torch_error(torch.nn.SyncBatchNorm(4), x)
    ours = cbt.SyncBatchNorm(4)
    saved = state(ours)
    got = torch_error(ours, x)
    assert type(got) is type(want) is ValueError and str(got) == str(want)
    assert "Expected more than 1 value per channel when training" in str(got)
    assert_state(ours, saved)
    ours.eval()
    torch.testing.assert_close(ours(x), torch.nn.SyncBatchNorm(4).eval()(x))      # eval: fine, as torch
    untracked = cbt.SyncBatchNorm(4, track_running_stats=False).eval()            # batch stats in eval: raises
    assert str(torch_error(untracked, x)) == str(torch_error(torch.nn.SyncBatchNorm(4, track_running_stats=False)
                                                             .eval(), x))
    two = torch.randn((2,) + shape[1:])                       # control: two values per channel are fine
    torch.testing.assert_close(cbt.SyncBatchNorm(4)(two), torch.nn.SyncBatchNorm(4)(two))


def test_wrong_channel_count_blames_the_input_and_changes_nothing():
    x = torch.randn(2, 3, 4, 4)
    want = torch_error(torch.nn.BatchNorm2d(4), x)
    ours = cbt.SyncBatchNorm(4)
    ours(torch.randn(2, 4, 4, 4))
    saved = state(ours)
    got = torch_error(ours, x)
    assert isinstance(got, type(want)) and isinstance(got, ValueError)
    assert "input" in str(got) and "3 channels" in str(got) and "running_mean" not in str(got)
    assert_state(ours, saved)
    assert int(ours.num_batches_tracked) == 1


def test_any_channel_count_without_per_channel_tensors_as_torch():
    theirs = torch.nn.BatchNorm2d(4, affine=False, track_running_stats=False).double()
    ours = cbt.SyncBatchNorm(4, affine=False, track_running_stats=False).double()
    x = torch.randn(3, 6, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_floating_input_is_torchs_error_and_changes_nothing(dtype):
    x = torch.ones(2, 4, 3, 3).to(dtype)
    want = torch_error(torch.nn.BatchNorm2d(4), x)
    ours = cbt.SyncBatchNorm(4)
    saved = state(ours)
    got = torch_error(ours, x)
    assert isinstance(got, type(want)) and isinstance(got, TypeError), (type(got), type(want))
    assert str(dtype) in str(got)
    assert_state(ours, saved)


@pytest.mark.parametrize("x,module", [
    (torch.randn(4), dict()), (torch.randn(2, 0, 3), dict()), (torch.randn(3, 4), dict(eps=0.0)),
    (torch.randn(3, 4), dict(eps=-1.0))], ids=["1d", "no channels", "eps 0", "eps<0"])
def test_torchs_other_errors_with_torchs_messages(x, module):
    want = torch_error(torch.nn.SyncBatchNorm(x.shape[1] if x.dim() > 1 and x.shape[1] else 4, **module), x)
    ours = cbt.SyncBatchNorm(x.shape[1] if x.dim() > 1 and x.shape[1] else 4, **module)
    saved = state(ours)
    got = torch_error(ours, x)
    assert type(got) is type(want) and str(got) == str(want)
    assert_state(ours, saved)


def test_a_call_failing_anywhere_changes_nothing(monkeypatch):
    ours = cbt.SyncBatchNorm(4, momentum=None)
    ours(torch.randn(3, 4))
    saved = state(ours)

    def fail(*args, **kwargs):
        raise RuntimeError("the core failed")
    monkeypatch.setattr(cbt, "sync_batch_norm", fail)
    with pytest.raises(RuntimeError, match="the core failed"):
        ours(torch.randn(3, 4, dtype=torch.bfloat16))
    assert_state(ours, saved)
    monkeypatch.undo()
    ours(torch.randn(3, 4))                                   # control: a good call counts
    assert int(ours.num_batches_tracked) == 2


# -- non-finite warnings ----------------------------------------------------------------------

def nan_input(c=2):
    x = torch.randn(4, c)
    x[0, 0] = float("nan")
    return x


def test_each_module_warns_once_for_itself_and_names_itself():
    model = cbt.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Identity(),
                                                           torch.nn.BatchNorm1d(2)))
    other = cbt.SyncBatchNorm(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(nan_input())
            other(nan_input())
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 3, said
    names = [model[0]._cusyncbn_name, model[2]._cusyncbn_name, other._cusyncbn_name]
    assert len(set(names)) == 3 and "(0)" in names[0] and "(2)" in names[1]
    assert sorted(s.split(":")[0] for s in said) == sorted(names)


def test_a_copy_warns_for_itself():
    bn = cbt.SyncBatchNorm(2)
    twin = copy.deepcopy(bn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(nan_input()), twin(nan_input())
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 2


def test_nan_warning_points_at_the_users_line():
    bn = cbt.SyncBatchNorm(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(nan_input())
    assert [os.path.basename(w.filename) for w in caught] == [os.path.basename(__file__)]


# -- pickling, copies --------------------------------------------------------------------------

class UnpicklableComm(TwinComm):
    def __init__(self):
        super().__init__()
        self.lock = __import__("threading").Lock()


def test_save_and_deepcopy_after_a_forward():
    bn = cbt.SyncBatchNorm(3).double()
    bn(torch.randn(4, 3, dtype=torch.float64))
    assert bn._comms and bn._views
    bn._comms["cpu"] = (None, None, True, UnpicklableComm(), False)       # as an MPIComm: cannot be pickled
    buf = io.BytesIO()
    torch.save(bn, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    twin = copy.deepcopy(bn)
    x = torch.randn(5, 3, dtype=torch.float64)
    for other in (loaded, twin):
        assert other._comms == {} and other._views == {}
        assert other._cusyncbn_name != bn._cusyncbn_name
        assert_state(other, state(bn))
    bn.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), bn(x))
    with pytest.raises(TypeError):
        pickle.dumps(bn.__dict__)                             # control: the cache itself does not pickle


# -- allreduce_gradients -----------------------------------------------------------------------

def small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), cbt.SyncBatchNorm(4), torch.nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("entry", ["cusyncbn", "cusyncbn.torch"])
def test_allreduce_gradients_reduces_torch_gradients_in_place(entry):
    reduce = cusyncbn.allreduce_gradients if entry == "cusyncbn" else cbt.allreduce_gradients
    model = small_model()
    model(torch.randn(6, 3)).square().sum().backward()
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad for p in model.parameters()]
    before = [None if g is None else g.clone() for g in grads]
    comm = TwinComm()
    reduce(model.parameters(), comm=comm)
    assert comm.calls == 1
    for p, w, g, b in zip(model.parameters(), weights, grads, before):
        assert torch.equal(p.detach(), w)                      # the weights are not touched
        if b is None:
            assert p.grad is None                              # frozen: skipped
        else:
            assert p.grad is g and torch.equal(g, 2 * b)        # in place, summed over the "two ranks"
    reduce(model.parameters(), comm=comm, op="mean")
    for p, b in zip(model.parameters(), before):
        if b is not None:
            assert torch.equal(p.grad, 2 * b)


def test_allreduce_gradients_16_bit_and_errors():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    p.grad = torch.full((3,), 1.5, dtype=torch.bfloat16)
    cbt.allreduce_gradients([p], comm=TwinComm())
    assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad, torch.full((3,), 3.0, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="op"):
        cbt.allreduce_gradients([p], op="max")
    with pytest.raises(TypeError, match="torch tensors"):
        cbt.allreduce_gradients([p, np.ones(3)])
    cbt.allreduce_gradients([torch.nn.Parameter(torch.ones(2))], comm=TwinComm())   # no grad: nothing to do


def test_allreduce_gradients_signature_matches_the_paddle_adapters():
    ours = inspect.signature(cbt.allreduce_gradients)
    assert [(p.name, p.default) for p in ours.parameters.values()] == [
        ("parameters", inspect.Parameter.empty), ("comm", None), ("op", "sum")]


# -- the converter -----------------------------------------------------------------------------

def old_modules():
    """(id, factory) of batch norms in every configuration a converter must carry."""
    cases = [("1d eps momentum=None affine=False", lambda: torch.nn.BatchNorm1d(5, eps=1e-3, momentum=None,
                                                                                affine=False)),
             ("2d untracked", lambda: torch.nn.BatchNorm2d(3, track_running_stats=False)),
             ("3d float64 eval", lambda: torch.nn.BatchNorm3d(2).double().eval()),
             ("frozen weight", lambda: _frozen(torch.nn.BatchNorm2d(3))),
             ("torch SyncBatchNorm", lambda: torch.nn.SyncBatchNorm(4, momentum=0.3))]
    if HAS_BIAS_ARG:
        cases.append(("no bias", lambda: torch.nn.BatchNorm2d(3, bias=False)))
    return cases


def _frozen(bn):
    bn.weight.requires_grad_(False)
    bn.qconfig = "a qconfig"
    return bn


@pytest.mark.parametrize("make", [m for _, m in old_modules()], ids=[i for i, _ in old_modules()])
def test_converter_carries_what_torchs_carries(make):
    old = make()
    theirs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # nothing to say about these
        ours = cbt.convert_sync_batchnorm(old)
    assert type(ours) is cbt.SyncBatchNorm
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training", "process_group"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert getattr(ours, "qconfig", None) == getattr(theirs, "qconfig", None)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(ours, name) is getattr(old, name), name                  # the same tensors
    assert [(n, p.requires_grad, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.requires_grad, p.dtype) for n, p in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    shape = (4, ours.num_features) + (3,) * {torch.nn.BatchNorm1d: 0, torch.nn.BatchNorm3d: 3}.get(type(old), 2)
    dtype = next((t.dtype for t in ours.parameters()), None) or next((t.dtype for t in ours.buffers()
                                                                      if t.is_floating_point()), torch.float32)
    x = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x))            # and behaves as torch's conversion
    assert_state(ours, state(theirs), exact=False)


def test_converter_carries_hooks_attributes_and_buffer_persistence():
    old = torch.nn.BatchNorm1d(3)
    seen = []
    handle = old.register_forward_hook(lambda m, args, out: seen.append(m))
    old.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    loaded = []
    old._register_load_state_dict_pre_hook(lambda m, *args: loaded.append(m), with_module=True)
    old.norm_eval = True
    old._non_persistent_buffers_set.add("num_batches_tracked")
    new = cbt.convert_sync_batchnorm(torch.nn.Sequential(old))[0]
    x = torch.randn(4, 3)
    torch.testing.assert_close(new(x), torch.nn.functional.batch_norm(x + 1, None, None, old.weight, old.bias, True))
    assert seen == [new] and new.norm_eval is True
    assert "num_batches_tracked" not in new.state_dict()
    del old
    new.load_state_dict(new.state_dict(), strict=False)
    assert loaded == [new]                                    # bound to the new module
    handle.remove()                                           # the old handle removes it from the new one
    new(x)
    assert seen == [new]


def test_converter_replaces_a_shared_module_everywhere():
    bn = torch.nn.BatchNorm1d(3)
    model = torch.nn.Sequential(bn, torch.nn.ReLU(), bn)
    inner = torch.nn.Sequential(bn)
    outer = torch.nn.ModuleDict({"model": model, "inner": inner})
    cbt.convert_sync_batchnorm(outer)
    assert type(model[0]) is cbt.SyncBatchNorm and model[0] is model[2] is inner[0]


def test_converter_keeps_torchs_layout_rules():
    """As torch's converter: a batch norm's children move to the replacement, the model's
    own object is returned, a batch norm given alone comes back new."""
    old = torch.nn.BatchNorm2d(2)
    old.add_module("child", torch.nn.BatchNorm2d(2))
    new = cbt.convert_sync_batchnorm(old)
    assert new is not old and type(new.child) is cbt.SyncBatchNorm
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert cbt.convert_sync_batchnorm(model) is model
    converted = cbt.convert_sync_batchnorm(torch.nn.Sequential(cbt.SyncBatchNorm(2)))
    assert converted[0]._cusyncbn_label == "0"


class OwnForward(torch.nn.BatchNorm1d):
    def forward(self, x):
        return super().forward(x) * 2


class OnlyInit(torch.nn.BatchNorm1d):
    def __init__(self, n):
        super().__init__(n)
        self.tag = "kept"


def test_converter_says_what_it_cannot_carry():
    with pytest.warns(UserWarning, match=r"OwnForward\).*own forward"):
        new = cbt.convert_sync_batchnorm(torch.nn.Sequential(OwnForward(3)))[0]
    assert type(new) is cbt.SyncBatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # control: nothing lost, nothing said
        assert cbt.convert_sync_batchnorm(OnlyInit(3)).tag == "kept"
    lazy = torch.nn.LazyBatchNorm1d()
    with pytest.raises(ValueError, match="lazy module not yet initialised"):
        cbt.convert_sync_batchnorm(torch.nn.Sequential(lazy))
    lazy(torch.randn(4, 3))                                   # initialised: converts
    assert cbt.convert_sync_batchnorm(lazy).num_features == 3
    parametrized = torch.nn.BatchNorm1d(3)
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", torch.nn.Identity())
    with pytest.raises(ValueError, match="parametrizations \\(weight\\)"):
        cbt.convert_sync_batchnorm(parametrized)
    group = object()
    old = torch.nn.SyncBatchNorm(3, process_group=group)
    assert cbt.convert_sync_batchnorm(copy.copy(old)).process_group is group
    with pytest.warns(UserWarning, match="takes its place"):
        assert cbt.convert_sync_batchnorm(old, comm=TwinComm()).process_group is None


# -- torch.distributed's world by default (torchrun) --------------------------------------------

TORCHRUN_WORKER = r"""
import json, sys, numpy as np, torch, torch.distributed as dist
import cusyncbn.torch as cbt
rank, path = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
x = torch.tensor([[0.0], [2.0]] if rank == 0 else [[10.0], [12.0], [14.0]], dtype=torch.float64)
bn = cbt.SyncBatchNorm(1).double()
y = bn(x)
bn.eval()
print("RESULT", json.dumps({"y": y.flatten().tolist(), "mean": bn.running_mean.item(),
                            "comm": type(bn._comms["cpu"][3]).__name__}), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_syncs_over_torch_distributed_world_by_default(tmp_path):
    """As torch's module under torchrun: no comm, no process_group, no MPI launcher, and
    torch.distributed initialised with two processes: the module syncs over its world."""
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_", "HYDRA_"))}
    env["PYTHONPATH"] = ROOT
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "rdv")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(next(l for l in o[0].splitlines() if l.startswith("RESULT"))[7:]) for o in outs]
    whole = np.array([0.0, 2.0, 10.0, 12.0, 14.0])
    want = (whole - whole.mean()) / np.sqrt(whole.var() + 1e-5)
    np.testing.assert_allclose(results[0]["y"] + results[1]["y"], want, rtol=1e-9)
    assert [r["comm"] for r in results] == ["TorchDistComm"] * 2
    np.testing.assert_allclose([r["mean"] for r in results], [0.1 * whole.mean()] * 2, rtol=1e-12)


# -- multi-rank cases (tests/torch_worker.py) ---------------------------------------------------

def run_torch_ranks(n, case):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    launcher = mpiexec()
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
    extra = ["--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    proc = subprocess.run([launcher, "-n", str(n), *extra, sys.executable, "-m", "mpi4py",
                           os.path.join(HERE, "torch_worker.py"), case],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"mpiexec -n {n} {case} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
        f"stderr:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


TORCH_CASES = ["eval_untracked_uses_own_batch", "global_batch_of_one_value", "modes_match_torch_on_whole_batch",
               "low_precision_matches_reference", "allreduce_torch_gradients", "broken_sync_is_caught",
               "fused_epilogue_matches_torch_on_whole_batch"]


@pytest.mark.slow
def test_case_list_is_the_workers():
    assert sorted(run_torch_ranks(1, "--list")["cases"]) == sorted(TORCH_CASES)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("case", [c for c in TORCH_CASES if c != "broken_sync_is_caught"])
def test_multi_rank_torch(case, n):
    result = run_torch_ranks(n, case)
    assert result["size"] == n
    assert result["errors"] == [], "\n".join(result["errors"])


def test_multi_rank_checks_can_fail():
    """Negative control: the whole-batch comparison of the worker, run with each rank
    normalizing alone (sync=False), reports mismatches."""
    result = run_torch_ranks(2, "broken_sync_is_caught")
    assert result["errors"] and all("mismatch" in e for e in result["errors"]), result["errors"]


# -- the example ---------------------------------------------------------------------------------

def run_example(*args):
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([os.path.join(bindir, "mpiexec"), "-n", "2", sys.executable, "examples/torch_convert.py",
                           *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=ROOT)


@pytest.mark.slow
def test_example_compares_with_one_process_on_uneven_batches():
    proc = run_example("--steps", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "per-rank batch [10, 22]" in proc.stdout and "whole batch" in proc.stdout and ": OK" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_example_reports_a_mismatch_without_sync():
    proc = run_example("--steps", "4", "--no-sync")
    assert proc.returncode == 1 and ": MISMATCH" in proc.stdout, proc.stdout + proc.stderr


def test_example_header_command_works_after_the_readme_install():
    header = open(os.path.join(ROOT, "examples", "torch_convert.py")).read().split('"""')[1]
    assert ".venv/bin/mpiexec -n 2 .venv/bin/python examples/torch_convert.py" in header
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "python3 -m venv .venv" in readme                  # the venv the header's paths point into


# -- GPU versions (skipped without CUDA) -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("param_dtype", ["float32", "input"])
def test_dtypes_on_cuda(dtype, param_dtype):
    torch.manual_seed(0)
    bn = cbt.SyncBatchNorm(4).cuda()
    if param_dtype == "input":
        bn = bn.to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, 4))
    x = (torch.randn(8, 4, 3, 3) + 5).to("cuda", dtype).requires_grad_()
    dy = torch.randn(8, 4, 3, 3).to("cuda", dtype)
    y = bn(x)
    y.backward(dy)
    assert y.dtype == x.grad.dtype == dtype and bn.weight.grad.dtype == bn.weight.dtype
    want_y, want_dx, want_dw, want_db, mean, var = reference_pass(x.cpu(), dy.cpu(), bn.weight.cpu(), bn.bias.cpu())
    tol = low_tolerance(dtype) if dtype in LOW else 1e-5
    np.testing.assert_allclose(y.detach().double().cpu().numpy(), want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(x.grad.double().cpu().numpy(), want_dx, rtol=tol, atol=tol * np.abs(want_dx).max())
    ptol = low_tolerance(dtype) * 2 if bn.weight.dtype in LOW else 1e-4
    np.testing.assert_allclose(bn.running_mean.double().cpu().numpy(), 0.1 * mean, rtol=ptol)
    np.testing.assert_allclose(bn.weight.grad.double().cpu().numpy(), want_dw, rtol=ptol,
                               atol=ptol * np.abs(want_dw).max())


@pytest.mark.gpu
def test_modes_match_torch_on_cuda():
    theirs = torch.nn.SyncBatchNorm(4, momentum=None).cuda().double()
    ours = cbt.SyncBatchNorm(4, momentum=None).cuda().double()
    def host(record):
        return [(n, t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in record]
    assert_same_record(host(run_sequence(ours, "cuda")), host(run_sequence(theirs, "cuda")))


def test_docstring_examples_run():
    import doctest
    result = doctest.testmod(cbt, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
