"""The planned path (cusyncbn._planned) against the full path, on the emulated GPU backend.

The real CupyBackend host code with emulated kernels (tests/cuda_emu): a call whose
signature has a plan launches pre-packed arguments without validation; anything else
takes the full path. ``EmuBackend._run`` is what the full path launches through, so
counting its calls tells which path a call took.
"""
import threading

import numpy as np
import pytest

import cusyncbn
from cusyncbn import _planned
from cusyncbn.functional import flush_reports

import cuda_emu

SHAPES = [("NCHW", (4, 8, 5, 5)), ("NHWC", (3, 4, 4, 8)), ("NC", (6, 8))]


@pytest.fixture
def emu(use_backend):
    backend = use_backend(cuda_emu.EmuBackend(sms=4))
    backend.full = 0
    run = backend._run

    def counted(plan, values):
        backend.full += 1
        run(plan, values)
    backend._run = counted
    _planned.clear()
    yield backend
    _planned.clear()
    flush_reports()


def device(a, dtype="float32"):
    return cuda_emu.guarded_copy(np.asarray(a, dtype=dtype))


def steps(bn, xs, dys):
    out = []
    for x, dy in zip(xs, dys):
        y = bn(x).copy()
        dx = bn.backward(dy).copy()
        out.append((y, dx))
    return out, [np.array(a) for a in (bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)]


def data(shape, n=3, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    xs = [device(rng.normal(2.0, 3.0, size=shape), dtype) for _ in range(n)]
    dys = [device(rng.normal(size=shape), dtype) for _ in range(n)]
    return xs, dys


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("data_format,shape", SHAPES)
def test_planned_results_are_bitwise_those_of_the_full_path(emu, monkeypatch, data_format, shape, dtype):
    xs, dys = data(shape, dtype=dtype)
    planned = steps(cusyncbn.SyncBatchNorm(shape[-1] if data_format == "NHWC" else shape[1], data_format=data_format),
                    xs, dys)
    assert emu.full == 5, "only the first training step takes the full path (two moments: no pivot yet)"
    monkeypatch.setattr(_planned, "enabled", False)
    _planned.clear()
    emu.full = 0
    full = steps(cusyncbn.SyncBatchNorm(shape[-1] if data_format == "NHWC" else shape[1], data_format=data_format),
                 xs, dys)
    assert emu.full == 5 + 4 * (len(xs) - 1)
    for (y, dx), (y_full, dx_full) in zip(planned[0], full[0]):
        np.testing.assert_array_equal(y, y_full)
        np.testing.assert_array_equal(dx, dx_full)
    for a, b in zip(planned[1], full[1]):
        np.testing.assert_array_equal(a, b)


def test_the_comparison_can_fail(emu):
    """Negative control: a planned forward with one pointer cell pointing elsewhere differs."""
    xs, dys = data((4, 8, 5, 5))
    bn = cusyncbn.SyncBatchNorm(8)
    y0 = bn(xs[0]).copy()
    bn.backward(dys[0])
    plan = next(iter(_planned.FORWARD.values()))
    entry = plan.entry()
    plan.recycle(entry)
    entry.normalize_args.set("weight", emu.address_of(device(np.full(8, 3.0))))
    y1 = bn(xs[0]).copy()
    assert emu.full == 5 and not np.array_equal(y0, y1)


def test_a_new_signature_takes_the_full_path_and_gets_its_own_plan(emu):
    bn = cusyncbn.SyncBatchNorm(8)
    calls = []
    for shape in [(4, 8, 5, 5), (4, 8, 5, 5), (2, 8, 5, 5), (2, 8, 5, 5), (4, 8, 5, 5)]:
        before = emu.full
        x, dy = data(shape, n=1)
        bn(x[0])
        bn.backward(dy[0])
        calls.append(emu.full - before)
    assert calls == [5, 0, 4, 0, 0] and len(_planned.FORWARD) == 2     # 5: the first call finds a pivot


def test_each_path_is_taken_as_the_signature_says(emu):
    bn = cusyncbn.SyncBatchNorm(8)
    (x, x2), (dy, _) = data((4, 8, 5, 5), n=2)

    def full_launches(fn):
        before = emu.full
        fn()
        return emu.full - before

    def step():
        bn(x)
        bn.backward(dy)
    assert full_launches(step) == 5                       # first call: full path (finds a pivot), plans made
    assert full_launches(step) == 0                       # planned
    bn.weight.data = device(np.full(8, 2.0))              # a replaced parameter: new identity
    bn.weight.grad = None
    assert full_launches(step) == 4
    assert full_launches(step) == 0
    bn.eval()
    with cusyncbn.no_grad():
        assert full_launches(lambda: bn(x)) == 1          # eval: its own signature
        assert full_launches(lambda: bn(x)) == 0
    bn.train()
    assert full_launches(step) == 0                       # back to the training plan
    stream = type("Stream", (), {"ptr": 12345, "is_capturing": staticmethod(lambda: False)})()
    default = emu.current_stream
    emu.current_stream = lambda: stream
    assert full_launches(step) == 4                       # another stream
    assert full_launches(step) == 0
    stream.is_capturing = lambda: True
    assert full_launches(step) == 4                       # capturing: never planned
    emu.current_stream = default
    worker = threading.Thread(target=lambda: emu.__setattr__("thread_full", full_launches(step)))
    worker.start()
    worker.join()
    assert emu.thread_full == 4                           # another thread: its own plans
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(emu, "current_device", lambda: 1)      # another device current: full path
        assert full_launches(step) == 4
    misaligned = cuda_emu.guarded_copy(np.asarray(x), misalign=True)
    assert full_launches(lambda: (bn(misaligned), bn.backward(dy))) == 4   # another alignment class


def test_a_bad_call_after_warm_up_raises_the_same_error_and_changes_nothing(emu):
    (x,), (dy,) = data((4, 8, 5, 5), n=1)
    bad = device(np.ones((4, 5, 5, 5)))
    fresh = cusyncbn.SyncBatchNorm(8)
    with pytest.raises(ValueError) as expected:
        fresh(bad)
    bn = cusyncbn.SyncBatchNorm(8)
    for _ in range(2):
        bn(x)
        bn.backward(dy)
    state = [np.array(a) for a in (bn.running_mean, bn.running_var, bn.weight.grad, bn.bias.grad)]
    with pytest.raises(ValueError) as raised:
        bn(bad)
    assert str(raised.value) == str(expected.value).replace(fresh.name, bn.name)
    bn(x)
    with pytest.raises(ValueError, match="dy has shape"):
        bn.backward(device(np.ones((2, 8, 5, 5))))
    with pytest.raises(TypeError, match="floating dtype"):
        bn.backward(device(np.ones((4, 8, 5, 5)), "int32"))
    bn.backward(dy)                                       # the pending forward is still there
    after = [np.array(a) for a in (bn.running_mean, bn.running_var)]
    assert not np.array_equal(after[0], state[0])         # the good forward moved them, once
    bn2 = cusyncbn.SyncBatchNorm(8)
    for _ in range(3):
        bn2(x)
        bn2.backward(dy)
    np.testing.assert_array_equal(after[0], np.array(bn2.running_mean))


class TwoRanks:
    """A 2-rank communicator stand-in: the other rank holds the same batch, and is one
    collective ahead (its tag is t + 1) while ``out_of_step``, so the payload's tag check
    must fail then."""

    rank, size = 0, 2
    out_of_step = False

    def allreduce(self, buf):
        buf *= 2
        if self.out_of_step:
            buf[-2] += 1            # the collective's number: tags[0] of either payload layout


def test_nonfinite_statistics_are_reported_through_the_slots(emu):
    (x,), (dy,) = data((4, 8, 5, 5), n=1)
    bn = cusyncbn.SyncBatchNorm(8, name="the_layer")
    bn(x)
    bn.backward(dy)
    before = np.array(bn.running_mean)
    nan = np.array(x)
    nan[0, 3, 0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="the_layer: the global batch statistics"):
        bn(device(nan))                                    # planned; the report lands, the next call reports
        bn.backward(dy)
        flush_reports()
    after = np.array(bn.running_mean)
    assert after[3] == before[3] and not np.array_equal(np.delete(after, 3), np.delete(before, 3))
    raising = cusyncbn.SyncBatchNorm(8, nonfinite="raise")
    raising(x)
    raising.backward(dy)
    raising(device(nan))
    with pytest.raises(FloatingPointError):
        raising.backward(dy)                               # reported by the next call into cusyncbn
    raising.backward(dy)
    flush_reports()


def test_ranks_out_of_step_are_reported_through_the_slots(emu):
    (x,), (dy,) = data((4, 8, 5, 5), n=1)
    comm = TwoRanks()
    bn = cusyncbn.SyncBatchNorm(8, comm=comm)
    bn(x)
    bn.backward(dy)
    flush_reports()                                        # in step: nothing to report
    before = np.array(bn.running_mean)
    comm.out_of_step = True
    bn(x)                                                  # planned (same signature)
    with pytest.raises(RuntimeError, match=r"collective #4 \(forward\)"):
        bn.backward(dy)                                    # the forward's report arrives here
    np.testing.assert_array_equal(np.array(bn.running_mean), before)
    bn.backward(dy)                                        # the forward is still pending
    with pytest.raises(RuntimeError, match=r"collective #5 \(backward\)"):
        flush_reports()
    assert emu.full == 5                                   # all but the first step were planned


def test_flush_waits_for_the_device(emu):
    (x,), (dy,) = data((4, 8, 5, 5), n=1)
    bn = cusyncbn.SyncBatchNorm(8)
    bn(x)
    bn.backward(dy)
    ring = emu.report_ring()
    synced = []
    ring.synchronize = lambda: synced.append(1)
    nan = np.array(x)
    nan[0, 0, 0, 0] = np.nan
    bn(device(nan))
    with pytest.warns(RuntimeWarning):
        flush_reports()
    assert synced == [1]


def test_the_rawkernel_call_fallback_gives_the_same_bits(emu):
    """``launch_mode="call"``: every launch through ``RawKernel.__call__`` (argument tuples,
    checked by the emulator against the kernel's parameter types), every call on the full path."""
    xs, dys = data((4, 8, 5, 5))
    packed = steps(cusyncbn.SyncBatchNorm(8), xs, dys)
    emu.set_launch_mode("call")
    _planned.clear()
    launches = []
    emu.packed_launcher = lambda *a: launches.append(a)
    emu.full = 0
    called = steps(cusyncbn.SyncBatchNorm(8), xs, dys)
    assert launches == [] and emu.full == 5 + 4 * (len(xs) - 1)
    for (y, dx), (y_call, dx_call) in zip(packed[0], called[0]):
        np.testing.assert_array_equal(y, y_call)
        np.testing.assert_array_equal(dx, dx_call)
    for a, b in zip(packed[1], called[1]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="launch mode"):
        emu.set_launch_mode("fast")


def _torch_kit():
    torch = pytest.importorskip("torch")
    from operator import methodcaller
    return (methodcaller("data_ptr"), methodcaller("stride"), torch.Tensor,
            lambda a: torch.from_numpy(np.array(a)), torch.empty_like, lambda n: torch.zeros(n), lambda t: t.numpy())


def _paddle_kit():
    paddle = pytest.importorskip("paddle")
    from cusyncbn import paddle as cbp
    return (cbp._data_ptr, cbp._layout, paddle.Tensor, lambda a: paddle.to_tensor(np.array(a)), paddle.empty_like,
            lambda n: paddle.zeros([n]), lambda t: t.numpy())


@pytest.mark.parametrize("kit", [_torch_kit, _paddle_kit], ids=["torch", "paddle"])
def test_foreign_tensors_and_outputs_take_the_planned_path_as_they_are(emu, kit):
    """What the torch and Paddle adapters do on a GPU, on the emulator with CPU tensors: inputs
    and caller-provided outputs of an accepted type are read through their own address getter
    (no DLPack exchange on a planned call); results bitwise those of the backend's own arrays."""
    pointer, layout, cls, tensor, empty_like, zeros, to_numpy = kit()
    from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
    emu.accept_array_type(cls, pointer, layout)
    xs, dys = data((4, 8, 5, 5))

    def run(as_tensor):
        rm, rv, w, b = device(np.zeros(8)), device(np.ones(8)), device(np.linspace(0.5, 2, 8)), device(np.ones(8))
        results = []
        for x, dy in zip(xs, dys):
            if as_tensor:
                x, dy = tensor(x), tensor(dy)
                outs = {"input_grad_out": empty_like(dy), "weight_grad_out": zeros(8), "bias_grad_out": zeros(8)}
                y_out = empty_like(x)
            else:
                outs, y_out = {}, None
            y, ctx = sync_batch_norm(x, rm, rv, w, b, device="cpu", name="bn", out=y_out)
            assert y_out is None or y is y_out
            dx, dw, db = sync_batch_norm_backward(ctx, dy, **outs)
            assert not as_tensor or (dx is outs["input_grad_out"] and dw is outs["weight_grad_out"])
            results.append([np.array(to_numpy(a) if isinstance(a, cls) else a) for a in (y, dx, dw, db)])
        return results, [np.array(a) for a in (rm, rv)]

    native = run(False)
    emu.full = 0
    tensors = run(True)
    assert emu.full == 5                                  # the first step only
    for got, want in zip(tensors[0] + [tensors[1]], native[0] + [native[1]]):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_caller_provided_outputs_are_checked_before_any_collective(emu):
    from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
    (x,), (dy,) = data((4, 8, 5, 5), n=1)
    comm = TwoRanks()
    calls = []
    reduce = comm.allreduce
    comm.allreduce = lambda buf: calls.append(buf.size) or reduce(buf)
    for out, error, match in [(device(np.zeros((4, 8, 5))), ValueError, "out has shape"),
                              (device(np.zeros((4, 8, 5, 5)), "float64"), ValueError, "dtype float64"),
                              (device(np.zeros((4, 5, 5, 8))).transpose(0, 3, 1, 2), ValueError, "C-contiguous"),
                              (x, ValueError, "not be the input")]:
        with pytest.raises(error, match=match):
            sync_batch_norm(x, comm=comm, device="cpu", out=out)
    assert calls == []
    out = device(np.zeros((4, 8, 5, 5)))
    y, ctx = sync_batch_norm(x, comm=comm, device="cpu", out=out)
    assert y is out and calls == [19, 19]                 # no running statistics: two all-reduces
    with pytest.raises(ValueError, match="input_grad_out has shape"):
        sync_batch_norm_backward(ctx, dy, input_grad_out=device(np.zeros((4, 8, 25))))
    assert calls == [19, 19]
    dx_out = device(np.zeros((4, 8, 5, 5)))
    dx, _, _ = sync_batch_norm_backward(ctx, dy, input_grad_out=dx_out)
    assert dx is dx_out and calls == [19, 19, 18]


def test_a_nonfinite_warning_points_at_the_users_line(emu):
    (x,), (dy,) = data((4, 8, 5, 5), n=1)
    bn = cusyncbn.SyncBatchNorm(8)
    bn(x)
    bn.backward(dy)
    nan = np.array(x)
    nan[0, 0, 0, 0] = np.nan
    bn(device(nan))
    with pytest.warns(RuntimeWarning) as caught:
        bn.backward(dy)                                    # the report arrives here
    assert caught[0].filename == __file__


def test_a_planned_forward_released_on_another_stream_is_not_reused(emu):
    (x,), (dy,) = data((4, 8, 5, 5), n=1)
    bn = cusyncbn.SyncBatchNorm(8)
    for _ in range(2):
        bn(x)
        bn.backward(dy)
    plan = next(iter(_planned.FORWARD.values()))
    assert len(plan.free) == 1                             # the second step's set, back after its backward
    bn(x)                                                  # planned: takes it
    assert len(plan.free) == 0
    side = type("Stream", (), {"ptr": 777, "is_capturing": staticmethod(lambda: False)})()
    default = emu.current_stream
    emu.current_stream = lambda: side
    bn.backward(dy)                                        # on another stream: full path, not recycled
    emu.current_stream = default
    assert len(plan.free) == 0
    bn(x)
    bn.backward(dy)                                        # planned, on the plan's stream: recycled
    assert len(plan.free) == 1


# ---- the fused epilogue (activation, residual) on the planned path --------------------------------

EPILOGUES = [("relu", True), ("relu", False), (None, True)]


def fused_steps(xs, dys, rs, data_format, activation, backward=None):
    """Steps of the functional core with the epilogue (parameters' gradients into given arrays,
    as the layer does): every result, then the running statistics and gradients."""
    from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
    c = xs[0].shape[-1] if data_format == "NHWC" else xs[0].shape[1]
    rm, rv, w, b = device(np.zeros(c)), device(np.ones(c)), device(np.linspace(0.5, 2, c)), device(np.linspace(-1, 1, c))
    wg, bg = device(np.zeros(c)), device(np.zeros(c))
    out = []
    for x, dy, r in zip(xs, dys, rs):
        kwargs = dict(backward or {})
        if kwargs.pop("residual_grad_out", False):
            kwargs["residual_grad_out"] = device(np.zeros(x.shape), x.dtype)
        y, ctx = sync_batch_norm(x, rm, rv, w, b, data_format=data_format, device="cpu", name="fused",
                                 activation=activation, residual=r)
        grads = sync_batch_norm_backward(ctx, dy, weight_grad_out=wg, bias_grad_out=bg, **kwargs)
        assert len(grads) == (3 if r is None else 4)
        assert "residual_grad_out" not in kwargs or grads[3] is kwargs["residual_grad_out"]
        out.append([None if a is None else np.array(a) for a in (y, *grads)])
    return out, [np.array(a) for a in (rm, rv, wg, bg)]


def assert_bitwise(a, b):
    for (steps_a, state_a), (steps_b, state_b) in [(a, b)]:
        for one, other in zip(steps_a + [state_a], steps_b + [state_b]):
            for u, v in zip(one, other):
                assert (u is None) == (v is None)
                if u is not None:
                    np.testing.assert_array_equal(u, v)


# The backward's dresidual options (a given output; dresidual without dx), with a residual only.
FUSED_CASES = [(activation, residual, backward) for activation, residual in EPILOGUES
               for backward in ({}, {"residual_grad_out": True}, {"input_grad": False}) if residual or not backward]


@pytest.mark.parametrize("activation,residual,backward", FUSED_CASES)
@pytest.mark.parametrize("data_format,shape", SHAPES)
def test_fused_planned_results_are_bitwise_those_of_the_full_path(emu, monkeypatch, data_format, shape, activation,
                                                                   residual, backward):
    xs, dys = data(shape, dtype="float16" if data_format == "NC" else "float32")
    rs = data(shape, seed=1, dtype=xs[0].dtype.name)[0] if residual else [None] * len(xs)
    planned = fused_steps(xs, dys, rs, data_format, activation, backward)
    # Without dx the dx kernel writes dresidual alone: still two launches per backward.
    assert emu.full == 5, "only the first step takes the full path (two moments: no pivot yet)"
    monkeypatch.setattr(_planned, "enabled", False)
    _planned.clear()
    emu.full = 0
    full = fused_steps(xs, dys, rs, data_format, activation, backward)
    assert emu.full == 5 + 4 * (len(xs) - 1)
    assert_bitwise(planned, full)


def test_an_epilogue_is_a_signature_of_its_own(emu):
    """A fused call after planned plain calls of the same input takes the full path once, then
    its own plan; neither plan runs the other's epilogue."""
    from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
    (x, x2), (dy, _) = data((4, 8, 5, 5), n=2)
    r = data((4, 8, 5, 5), seed=2)[0][0]
    rm, rv = device(np.zeros(8)), device(np.ones(8))
    results = {}
    for activation, residual in [(None, None), (None, None), ("relu", r), ("relu", r), ("relu", None), (None, None)]:
        before = emu.full
        y, ctx = sync_batch_norm(x, rm, rv, device="cpu", activation=activation, residual=residual)
        sync_batch_norm_backward(ctx, dy)
        results.setdefault((activation, residual is None), []).append((np.array(y), emu.full - before))
    plain, fused, relu = results[(None, True)], results[("relu", False)], results[("relu", True)]
    assert [n for _, n in plain] == [5, 0, 0] and [n for _, n in fused] == [4, 0] and [n for _, n in relu] == [4]
    assert (fused[1][0] >= 0).all() and (plain[1][0] < 0).any() and (relu[0][0] == np.maximum(plain[1][0], 0)).all()
    assert len(_planned.FORWARD) == 3


def test_a_misaligned_residual_takes_the_full_path(emu):
    from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
    (x,), (dy,) = data((4, 8, 16, 16), n=1)                  # runs of 256: slabs (_tuning.layout_for)
    r = data((4, 8, 16, 16), seed=2)[0][0]
    rm, rv = device(np.zeros(8)), device(np.ones(8))
    for _ in range(2):
        y, ctx = sync_batch_norm(x, rm, rv, device="cpu", activation="relu", residual=r)
        sync_batch_norm_backward(ctx, dy)
    before = emu.full
    misaligned = cuda_emu.guarded_copy(np.asarray(r), misalign=True)
    y2, ctx = sync_batch_norm(x, rm, rv, device="cpu", activation="relu", residual=misaligned)
    assert emu.full - before == 2 and "normalize_cs<float, float, 1>" in emu.launches
    sync_batch_norm_backward(ctx, dy)


def test_the_fused_comparison_can_fail(emu):
    """Negative control: a fused plan whose relu cell is cleared gives other results."""
    from cusyncbn.functional import sync_batch_norm
    (x,), _ = data((4, 8, 5, 5), n=1)
    r = data((4, 8, 5, 5), seed=2)[0][0]
    rm, rv = device(np.zeros(8)), device(np.ones(8))
    ys = []
    for _ in range(3):
        y, ctx = sync_batch_norm(x, rm, rv, device="cpu", activation="relu", residual=r, training=False)
        ys.append(np.array(y))
        ctx.release()                                   # a planned context's statistics set goes back
        plan = next(iter(_planned.FORWARD.values()))
        if len(ys) == 2:
            plan.free[-1].normalize_args.set("relu", 0)    # the set the next call takes
    np.testing.assert_array_equal(ys[0], ys[1])
    assert emu.full == 1 and (ys[0] >= 0).all() and (ys[2] < 0).any()
