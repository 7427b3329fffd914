"""The fused epilogue of cusyncbn.torch.SyncBatchNorm, as Apex's optimized SyncBatchNorm had it:
``fuse_relu`` and ``forward(input, z)`` give ``relu(BN(input) + z)`` (``BN(input) + z`` without
``fuse_relu``), ``z`` getting its gradient through autograd. Checked against torch's own batch
norm followed by ``+ z`` and ``torch.relu`` (every mode, float64, bit for bit up to rounding),
against finite differences, and against the float64 reference's fused forms (16-bit inputs
too); with the defaults the module stays torch's. The multi-rank case is
``fused_epilogue_matches_torch_on_whole_batch`` in tests/torch_worker.py."""
import copy
import inspect
from unittest import mock

import numpy as np
import pytest

import reference as ref
from fused_check import TOL, close

torch = pytest.importorskip("torch")
import cusyncbn.torch as cbt  # noqa: E402
from test_torch import TwinComm  # noqa: E402  (two ranks with the same batch, in one process)
from test_torch_dropin import CONFIGS, SEQUENCE, assert_same_record  # noqa: E402

EPILOGUES = [(True, True), (True, False), (False, True)]        # (fuse_relu, with z)


def theirs_of(ours, **config):
    """torch's own module of ``config`` (``ours``'s) with ``ours``'s parameters and buffers (a copy)."""
    theirs = torch.nn.SyncBatchNorm(ours.num_features, **config).double()
    theirs.load_state_dict(ours.state_dict())
    return theirs


def epilogue(y, z, fuse):
    """What the fused module computes after the batch norm, written with torch's own ops."""
    y = y if z is None else y + z
    return torch.relu(y) if fuse else y


def run_sequence(module, fuse, with_z, ours, shape=(5, 4, 3, 2), channels_last=False, device="cpu"):
    """(name, tensor) of every output and gradient (input, z, parameters) and the state after
    each step of test_torch_dropin's SEQUENCE of mode changes, ``z`` added and ReLU applied by
    the module itself (``ours``) or by torch's ops after it."""
    gen = torch.Generator().manual_seed(0)
    record = []
    for i, before in enumerate(SEQUENCE):
        before(module)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).to(device)
        z = torch.randn(shape, generator=gen, dtype=torch.float64).to(device) if with_z else None
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        if z is not None:
            z.requires_grad_()
        module.zero_grad()
        try:
            y = module(x, z) if ours else epilogue(module(x), z, fuse)
        except Exception as exc:                              # torch's error cases: the same error
            record.append((f"step {i} error", f"{type(exc).__name__}: {exc}"))
            continue
        (y * dy).sum().backward()
        record += [(f"step {i} y", y.detach()), (f"step {i} dx", x.grad)]
        if z is not None:
            record.append((f"step {i} dz", z.grad))
        record += [(f"step {i} {n}.grad", p.grad) for n, p in module.named_parameters()]
        record += [(f"step {i} {n}", t.clone()) for n, t in module.state_dict().items()]
    return [(n, t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in record]


@pytest.mark.parametrize("fuse,with_z", EPILOGUES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_every_mode_matches_torchs_batch_norm_add_and_relu(config, fuse, with_z):
    ours = cbt.SyncBatchNorm(4, fuse_relu=fuse, **config).double()
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(torch.linspace(0.5, 2, 4))
        if ours.bias is not None:
            ours.bias.copy_(torch.linspace(-1, 1, 4))
    theirs = theirs_of(ours, **config)
    assert_same_record(run_sequence(ours, fuse, with_z, True), run_sequence(theirs, fuse, with_z, False))


@pytest.mark.parametrize("shape,channels_last", [((5, 4), False), ((3, 4, 7), False), ((3, 4, 5, 2), True),
                                                 ((2, 4, 3, 2, 3), False), ((2, 4, 2, 3, 2, 2), False)],
                         ids=["2d", "3d", "channels_last", "5d", "6d"])
def test_every_rank_of_input_and_channels_last(shape, channels_last):
    ours = cbt.SyncBatchNorm(4, fuse_relu=True).double()
    theirs = theirs_of(ours)
    assert_same_record(run_sequence(ours, True, True, True, shape, channels_last)[:12],
                       run_sequence(theirs, True, True, False, shape, channels_last)[:12])


def test_z_in_another_memory_format_than_the_input():
    torch.manual_seed(1)
    ours = cbt.SyncBatchNorm(3, fuse_relu=True).double()
    theirs = theirs_of(ours)
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64)
    z = torch.randn(4, 3, 5, 2, dtype=torch.float64)
    for xf, zf in ((torch.channels_last, torch.contiguous_format), (torch.contiguous_format, torch.channels_last)):
        outs = []
        for module, fused in ((ours, True), (theirs, False)):
            xx = torch.empty_like(x, memory_format=xf).copy_(x).requires_grad_()
            zz = torch.empty_like(z, memory_format=zf).copy_(z).requires_grad_()
            y = module(xx, zz) if fused else epilogue(module(xx), zz, True)
            (y * torch.arange(y.numel(), dtype=torch.float64).view(y.shape).cos()).sum().backward()
            outs.append((y, xx.grad, zz.grad))
        for a, b in zip(*outs):
            assert a is not None and b is not None
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert outs[0][0].is_contiguous(memory_format=xf)


def finite_differences(f, tensors, h=1e-6):
    """The gradient of the scalar ``f()`` w.r.t. every element of ``tensors``, by central
    differences (the tensors changed in place and restored)."""
    grads = []
    for t in tensors:
        g = torch.zeros_like(t)
        flat, gflat = t.detach().view(-1), g.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + h
            plus = float(f())
            flat[i] = old - h
            minus = float(f())
            flat[i] = old
            gflat[i] = (plus - minus) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("fuse,with_z", EPILOGUES)
def test_gradients_match_finite_differences(fuse, with_z):
    """gradcheck's comparison (analytical against numerical) of dx, dz, dweight and dbias, in
    float64 (torch.autograd.gradcheck itself back-propagates one graph several times, which a
    batch norm context does not allow)."""
    gen = torch.Generator().manual_seed(2)
    bn = cbt.SyncBatchNorm(3, fuse_relu=fuse, track_running_stats=False).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.7, 1.3, 1.0]))
        bn.bias.copy_(torch.tensor([0.2, -0.4, 0.1]))
    x = (torch.randn(4, 3, 2, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    z = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64).requires_grad_() if with_z else None
    g = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)

    def loss():
        with torch.no_grad():
            return (bn(x, z) * g).sum()
    (bn(x, z) * g).sum().backward()
    tensors = [x, bn.weight, bn.bias] + ([z] if with_z else [])
    numeric = finite_differences(loss, tensors)
    for t, want in zip(tensors, numeric):
        torch.testing.assert_close(t.grad, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fuse,with_z", EPILOGUES)
@pytest.mark.parametrize("dtype", list(TOL))
def test_against_the_fused_reference(dtype, fuse, with_z):
    """Two training steps and an eval step against ``cusyncbn._reference``'s fused forms,
    16-bit inputs included (computed in float32 on the CPU, as torch does)."""
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(3)
    act = "relu" if fuse else None
    bn = cbt.SyncBatchNorm(4, fuse_relu=fuse, momentum=0.3)
    if dtype == "float64":
        bn = bn.double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(generator=gen)
    w, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    rm, rv = np.zeros(4), np.ones(4)
    tol = TOL[dtype]
    for step in range(3):
        if step == 2:
            bn.eval()
        x = (torch.randn(6, 4, 3, generator=gen) * 2 + 0.5).to(dt).requires_grad_()
        z = torch.randn(6, 4, 3, generator=gen).to(dt).requires_grad_() if with_z else None
        dy = torch.randn(6, 4, 3, generator=gen).to(dt)
        bn.zero_grad()
        y = bn(x, z)
        y.backward(dy)
        xs, dys = x.detach().double().numpy(), dy.double().numpy()
        zs = z.detach().double().numpy() if with_z else None
        if bn.training:
            want_y, mean, var = ref.fused_forward(xs, w, b, 1e-5, "NCL", zs, act)
            want = ref.fused_backward(xs, dys, w, b, 1e-5, "NCL", zs, act)
            rm, rv = ref.update_running(rm, rv, mean, var, xs.size // 4, 0.7, unbiased=True)
        else:
            want_y = ref.fused_eval_forward(xs, w, b, rm, rv, 1e-5, "NCL", zs, act)
            want = ref.fused_eval_backward(xs, dys, w, b, rm, rv, 1e-5, "NCL", zs, act)
        where = f"{dtype} fuse_relu={fuse} z={with_z} step {step}"
        host = lambda t: t.detach().double().numpy()        # noqa: E731
        close(y, want_y, tol, f"{where}: y", host)
        close(x.grad, want[0], tol, f"{where}: dx", host)
        close(bn.weight.grad, want[1], tol, f"{where}: dweight", host, xs.size // 4)
        close(bn.bias.grad, want[2], tol, f"{where}: dbias", host, xs.size // 4)
        if with_z:
            close(z.grad, want[3], tol, f"{where}: dz", host)
            assert z.grad.dtype == dt
        np.testing.assert_allclose(host(bn.running_mean), rm, rtol=1e-5, atol=1e-6, err_msg=where)
        np.testing.assert_allclose(host(bn.running_var), rv, rtol=1e-5, atol=1e-6, err_msg=where)
        assert y.dtype == x.grad.dtype == dt


def test_the_comparisons_can_fail():
    """Negative controls: the module without fuse_relu against torch's batch norm + relu, and
    the reference comparison of a module that drops z, both fail."""
    ours = cbt.SyncBatchNorm(4).double()
    with pytest.raises(AssertionError, match="step 0 y"):
        assert_same_record(run_sequence(ours, False, True, True), run_sequence(theirs_of(ours), True, True, False))
    with mock.patch.object(cbt.SyncBatchNorm, "_check_z", lambda self, z, x: None), \
            mock.patch.object(cbt, "_core_forward", wraps=lambda x, z, arrays, settings: core(x, None, arrays,
                                                                                              settings)):
        with pytest.raises(AssertionError, match="y"):
            test_against_the_fused_reference("float64", False, True)


core = cbt._core_forward


def test_defaults_leave_the_module_torchs():
    """``fuse_relu`` keyword-only and False by default: repr and state dict are torch's; it
    shows in the repr only when set; pickles made before it existed load as False; the
    converter makes modules without it."""
    params = inspect.signature(cbt.SyncBatchNorm).parameters
    assert params["fuse_relu"].kind is inspect.Parameter.KEYWORD_ONLY and params["fuse_relu"].default is False
    assert inspect.signature(cbt.SyncBatchNorm.forward).parameters["z"].default is None
    theirs, ours = torch.nn.SyncBatchNorm(5), cbt.SyncBatchNorm(5)
    assert repr(ours) == repr(theirs)[:-1] + ", backend=cusyncbn)"
    fused = cbt.SyncBatchNorm(5, fuse_relu=True)
    assert repr(fused) == repr(theirs)[:-1] + ", fuse_relu=True, backend=cusyncbn)"
    assert list(fused.state_dict()) == list(ours.state_dict()) == list(theirs.state_dict())
    old_pickle = dict(ours.__dict__)
    del old_pickle["fuse_relu"]
    revived = cbt.SyncBatchNorm.__new__(cbt.SyncBatchNorm)
    revived.__setstate__(old_pickle)
    assert revived.fuse_relu is False and "fuse_relu" not in repr(revived)
    copied = copy.deepcopy(fused)
    assert copied.fuse_relu is True
    old = torch.nn.BatchNorm2d(5)
    old.fuse_relu = True                                   # not a torch setting: the converter keeps it False
    assert cbt.convert_sync_batchnorm(old).fuse_relu is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_fuse_relu_raises_and_changes_nothing(value):
    with pytest.raises(TypeError, match=rf"^cusyncbn.torch.SyncBatchNorm: fuse_relu must be True or False, got "
                                        rf"{value!r}$"):
        cbt.SyncBatchNorm(3, fuse_relu=value)
    comm = TwinComm()
    bn = cbt.SyncBatchNorm(3, comm=comm).double()
    bn.fuse_relu = value                                   # attributes are read at call time
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(TypeError, match=rf"^SyncBatchNorm#\d+: fuse_relu must be True or False, got {value!r}$"):
        bn(torch.randn(4, 3, dtype=torch.float64))
    assert comm.calls == 0
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("z, kind, words", [
    (torch.zeros(4, 3), ValueError, r"z has shape \(4, 3\), expected the input's \(4, 3, 2\)"),
    (torch.zeros(4, 3, 2, 1), ValueError, r"z has shape \(4, 3, 2, 1\), expected the input's \(4, 3, 2\)"),
    (torch.zeros(4, 3, 2), TypeError, "z has dtype torch.float32, expected the input's torch.float64"),
    (np.zeros((4, 3, 2)), TypeError, "z must be a torch.Tensor \\(or None\\), got ndarray"),
    (torch.zeros(4, 3, 2, dtype=torch.float64, device="meta"), ValueError, "z is on meta, the input on cpu"),
    (None, None, None),                                         # the control: a valid call changes things
])
def test_bad_z_raises_and_changes_nothing(z, kind, words):
    comm = TwinComm()
    bn = cbt.SyncBatchNorm(3, comm=comm, fuse_relu=True).double()
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    if kind is None:
        bn(x, torch.zeros(4, 3, 2, dtype=torch.float64)).sum().backward()
        assert comm.calls > 0 and int(bn.num_batches_tracked) == 1 and x.grad is not None
        return
    with pytest.raises(kind, match=rf"^SyncBatchNorm#\d+: {words}"):
        bn(x, z)
    assert comm.calls == 0 and x.grad is None
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_output_changed_in_place_before_backward_is_torchs_error():
    """The ReLU mask is read from the output, saved as torch.relu saves its own: an in-place
    change of it makes the backward raise; without fuse_relu the output is not needed."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = cbt.SyncBatchNorm(3, fuse_relu=True).double()(x)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y = torch.relu(torch.nn.BatchNorm1d(3).double()(x))     # torch's own: the same error
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y = cbt.SyncBatchNorm(3).double()(x, torch.zeros(4, 3, dtype=torch.float64))
    y.mul_(2)
    y.sum().backward()                                      # control: no mask, nothing saved
    assert x.grad is not None


def test_only_z_needs_a_gradient():
    """z the only input needing a gradient: dz through the module, no dx and no backward
    all-reduce (dx is what needs it), the parameter gradients still this rank's shares."""
    comm = TwinComm()
    bn = cbt.SyncBatchNorm(3, comm=comm, fuse_relu=True).double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    bn(x, x)                                                  # a layer's first call may cost more
    for p in bn.parameters():
        p.requires_grad_(False)
    z = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    comm.calls = 0
    y = bn(x, z)
    y.sum().backward()
    assert comm.calls == 1                                    # the forward's only
    torch.testing.assert_close(z.grad, (y > 0).double())


def test_the_autograd_function_gets_z_and_the_activation_never_the_module():
    bn = cbt.SyncBatchNorm(3, fuse_relu=True).double()
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    with mock.patch.object(cbt._Function, "apply", wraps=cbt._Function.apply) as apply:
        y = bn(x, z)
    call, = apply.call_args_list
    x_in, weight, bias, z_in, arrays, settings = call.args
    assert z_in is z and weight is bn.weight and settings.activation == "relu"
    assert not any(isinstance(v, torch.nn.Module) for v in (*call.args, *arrays, *settings))
    y.sum().backward()
    assert z.grad is not None and x.grad is not None
    with torch.no_grad():                                     # the no-grad path: the same epilogue
        torch.testing.assert_close(bn(x, z), y.detach(), rtol=0, atol=0)


# -- GPU versions (skipped without CUDA) -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("fuse,with_z", EPILOGUES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_modes_match_torchs_batch_norm_add_and_relu_on_cuda(channels_last, fuse, with_z):
    """On CUDA (the CUDA kernels' epilogue), float64: every mode against cuDNN's batch norm
    followed by ``+ z`` and ``torch.relu``."""
    ours = cbt.SyncBatchNorm(4, fuse_relu=fuse).double()
    with torch.no_grad():
        ours.weight.copy_(torch.linspace(0.5, 2, 4))
        ours.bias.copy_(torch.linspace(-1, 1, 4))
    theirs = theirs_of(ours).cuda()
    ours = ours.cuda()
    got = run_sequence(ours, fuse, with_z, True, channels_last=channels_last, device="cuda")
    want = run_sequence(theirs, fuse, with_z, False, channels_last=channels_last, device="cuda")
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want):
        if isinstance(b, str):
            assert a == b, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)     # cuDNN's own rounding


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_16_and_32_bit_on_cuda_against_the_fused_reference(dtype):
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(5)
    bn = cbt.SyncBatchNorm(4, fuse_relu=True, momentum=0.3).cuda()
    x = (torch.randn(6, 4, 5, 3, generator=gen) * 2 + 0.5).to("cuda", dt).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    z = torch.randn(6, 4, 5, 3, generator=gen).to("cuda", dt).requires_grad_()
    dy = torch.randn(6, 4, 5, 3, generator=gen).to("cuda", dt)
    y = bn(x, z)
    y.backward(dy)
    xs, zs, dys = (t.detach().double().cpu().numpy() for t in (x, z, dy))
    w, b = bn.weight.detach().double().cpu().numpy(), bn.bias.detach().double().cpu().numpy()
    want_y = ref.fused_forward(xs, w, b, 1e-5, "NCHW", zs, "relu")[0]
    want = ref.fused_backward(xs, dys, w, b, 1e-5, "NCHW", zs, "relu")
    host = lambda t: t.detach().double().cpu().numpy()        # noqa: E731
    tol = TOL[dtype]
    close(y, want_y, tol, "y", host)
    close(x.grad, want[0], tol, "dx", host)
    close(z.grad, want[3], tol, "dz", host)
    close(bn.weight.grad, want[1], tol, "dweight", host, xs.size // 4)
    assert y.dtype == x.grad.dtype == z.grad.dtype == dt
