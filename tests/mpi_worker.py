"""Multi-rank test cases, run by tests/test_mpi.py as

    mpiexec -n N python -m mpi4py tests/mpi_worker.py CASE [cpu|gpu|emu]
    mpiexec -n 1 python -m mpi4py tests/mpi_worker.py --list     (the registered case names)

Every rank builds the same global batch from a seed, keeps its own slice, runs the
layer, and compares against the float64 reference on the global batch. Failures
are collected, never asserted, until every collective is done; then rank 0 prints
one line ``RESULT {json}``. ``python -m mpi4py`` aborts the whole job if a rank
raises, so a bug is a failure, not a hang.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402
from comms import CountingComm  # noqa: E402,F401 (paddle_worker uses it too)

import cusyncbn  # noqa: E402
from cusyncbn.functional import flush_reports  # noqa: E402

WORLD = MPI.COMM_WORLD
DEVICE = sys.argv[2] if len(sys.argv) > 2 else "cpu"      # cpu, gpu, or emu: the CUDA kernels emulated
LAYER_DEVICE = "cpu" if DEVICE == "emu" else DEVICE        # on the CPU (tests/cuda_emu) over MPIComm
if DEVICE == "gpu":
    os.environ.setdefault("NCCL_HOSTID", f"rank{WORLD.rank}")   # several ranks may share one GPU
    import cupy as xp
else:
    xp = np
EMULATED = None                 # with "emu": the CPU's backend, the real CupyBackend on emulated kernels
if DEVICE == "emu":
    import cuda_emu  # noqa: E402
    from cusyncbn._backend import swap_backend  # noqa: E402
    EMULATED = cuda_emu.EmuBackend(sms=4)
    swap_backend("cpu", EMULATED)
CASES = {}                      # name -> case; the names are listed again in tests/mpi_cases.py
GPU_CASES = {}                  # cases that need CUDA
TOL = {"float16": (2e-2, 1e-2), "float32": (1e-5, 1e-4), "float64": (1e-10, 1e-9)}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def make_comm(mpi_comm):
    if DEVICE == "gpu":
        return cusyncbn.NCCLComm(mpi_comm)
    return cusyncbn.MPIComm(mpi_comm)


def split_counts(total, size, kind):
    if kind == "even":
        base = [total // size] * size
        base[-1] += total - sum(base)
        return base
    if kind == "uneven":                      # 1, 2, 3, ... samples, remainder on the last rank
        counts = [min(r + 1, total) for r in range(size)]
        counts[-1] = max(0, total - sum(counts[:-1]))
        return counts
    if kind == "empty":                      # rank 0 holds nothing
        counts = [0] + [total // (size - 1)] * (size - 1)
        counts[-1] += total - sum(counts)
        return counts
    if kind == "all_empty":
        return [0] * size
    raise ValueError(kind)


def global_shape(data_format, n, c=3, spatial=(3, 2, 2)):
    ndim = len(data_format)
    rest = spatial[:ndim - 2]
    return (n, c) + rest if not ref.CHANNEL_LAST[data_format] or ndim == 2 else (n,) + rest + (c,)


def close(errors, what, got, want, dtype, tol=None):
    rtol, atol = tol or TOL[dtype]
    got, want = host(got).astype(np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        errors.append(f"{what}: shape {got.shape} != {want.shape}")
    elif got.size and not np.allclose(got, want, rtol=rtol, atol=atol):
        errors.append(f"{what}: max abs err {np.max(np.abs(got - want)):.3g}")
    elif not np.all(np.isfinite(got)):
        errors.append(f"{what}: non-finite values")


def train_and_compare(comm, mpi_comm, data_format="NCHW", split="uneven", dtype="float32", steps=3,
                      momentum=0.9, c=3, total=None, loc=0.0, scale=1.0, unbiased=False, layer=None,
                      affine=True, tol=None):
    """Train ``steps`` steps on a synced layer; compare everything with the global reference."""
    rank, size = mpi_comm.rank, mpi_comm.size
    total = 2 * size + 3 if total is None else total
    counts = split_counts(total, size, split)
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    shape = global_shape(data_format, total, c)
    rng = np.random.default_rng(1234)
    param_dtype = "float64" if dtype == "float64" else "float32"
    w = rng.uniform(0.5, 1.5, c).astype(param_dtype) if affine else np.ones(c)
    b = rng.normal(size=c).astype(param_dtype) if affine else np.zeros(c)
    bn = layer or cusyncbn.SyncBatchNorm(c, momentum=momentum, data_format=data_format, comm=comm,
                                         device=LAYER_DEVICE, unbiased_running_var=unbiased, dtype=param_dtype,
                                         weight_attr=None if affine else False,
                                         bias_attr=None if affine else False)
    if affine:
        bn.weight.data[...] = xp.asarray(w)
        bn.bias.data[...] = xp.asarray(b)
    rm, rv = np.zeros(c), np.ones(c)
    errors, dw_sum, db_sum = [], np.zeros(c), np.zeros(c)
    for step in range(steps):
        x = (loc + scale * rng.normal(size=shape)).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        y_loc = bn(xp.asarray(x[lo:hi]))
        dx_loc = bn.backward(xp.asarray(dy[lo:hi]))
        y_ref, mean, var = ref.forward(x, w, b, bn._epsilon, data_format)
        dx_ref, dw, db = ref.backward(x, dy, w, bn._epsilon, data_format)
        dw_sum, db_sum = dw_sum + dw, db_sum + db
        rm, rv = ref.update_running(rm, rv, mean, var, x.size // c, momentum, unbiased)
        close(errors, f"step {step} y", y_loc, y_ref[lo:hi], dtype, tol)
        close(errors, f"step {step} dx", dx_loc, dx_ref[lo:hi], dtype, tol)
        if host(y_loc).dtype != np.dtype(dtype) or host(dx_loc).dtype != np.dtype(dtype):
            errors.append(f"step {step}: output dtype {host(y_loc).dtype}/{host(dx_loc).dtype} != {dtype}")
    if affine:
        grads = np.concatenate([host(bn.weight.grad), host(bn.bias.grad)]).astype(np.float64)
        mpi_comm.Allreduce(MPI.IN_PLACE, grads)
        close(errors, "sum over ranks of weight.grad", grads[:c], dw_sum, "float32" if dtype != "float16" else dtype,
              tol and (1e-3, 1e-3))
        close(errors, "sum over ranks of bias.grad", grads[c:], db_sum, "float32" if dtype != "float16" else dtype)
    close(errors, "running mean", bn._mean, rm, "float32")
    close(errors, "running var", bn._variance, rv, "float32")
    stats = np.concatenate([host(bn._mean), host(bn._variance)])
    every = mpi_comm.allgather(stats.tobytes())
    if any(s != every[0] for s in every):
        errors.append("running statistics differ bitwise between ranks")
    return errors


@case
def sync_matches_global_reference():
    errors = []
    for data_format in ref.CHANNEL_LAST:
        for split in ("even", "uneven", "empty"):
            errors += [f"{data_format}/{split}: {e}"
                       for e in train_and_compare(make_comm(WORLD), WORLD, data_format, split)]
    return errors


@case
def dtypes_and_momentum():
    errors = []
    for dtype in ("float16", "float64"):
        errors += [f"{dtype}: {e}" for e in train_and_compare(make_comm(WORLD), WORLD, "NCHW", "uneven", dtype)]
    errors += [f"momentum 0.5: {e}" for e in train_and_compare(make_comm(WORLD), WORLD, "NHWC", "uneven",
                                                               momentum=0.5, steps=4)]
    errors += [f"unbiased: {e}" for e in train_and_compare(make_comm(WORLD), WORLD, "NCL", "uneven",
                                                           unbiased=True)]
    errors += [f"no affine: {e}" for e in train_and_compare(make_comm(WORLD), WORLD, "NC", "empty",
                                                            affine=False)]
    errors += [f"odd C: {e}" for e in train_and_compare(make_comm(WORLD), WORLD, "NCHW", "uneven", c=7)]
    return errors


@case
def default_comm_is_world():
    layer = cusyncbn.SyncBatchNorm(3, device=LAYER_DEVICE)
    errors = train_and_compare(None, WORLD, "NCHW", "uneven", layer=layer)
    if layer.comm.size != WORLD.size:
        errors.append(f"default comm has size {layer.comm.size}, expected {WORLD.size}")
    return errors


@case
def mpi4py_comm_argument_and_groups():
    group = WORLD.Split(WORLD.rank // 2)
    errors = train_and_compare(group, group, "NCHW", "uneven")
    return [f"group {WORLD.rank // 2}: {e}" for e in errors]


@case
def stable_for_large_mean():
    """Mean 1e4, std 1 in float32: y within 1e-3 of the reference (the float32 input itself is
    quantized to about 1e-3 there; E[x^2] - E[x]^2 would lose every digit)."""
    return train_and_compare(make_comm(WORLD), WORLD, "NHWC", "uneven", loc=1e4, scale=1.0, steps=2, total=64,
                             tol=(0.0, 1e-3))


@case
def stable_at_any_mean_float64():
    """Mean 1e8, std 1 in float64, uneven batches (an empty rank among 4): y, dx, the gradients
    and the running statistics within 1e-6 relative of the reference at every step, the
    layer's first included (E[x^2] - E[x]^2, or a combine around a far pivot, loses them)."""
    errors = []
    for loc in (1e6, -1e8):
        errors += train_and_compare(make_comm(WORLD), WORLD, "NCL", "empty" if WORLD.size > 2 else "uneven",
                                    dtype="float64", loc=loc, scale=1.0, steps=3, total=17, tol=(1e-6, 1e-6))
    return errors


@case
def unsynced_differs_negative_control():
    """The same comparison with a per-rank (unsynced) layer must fail, or the tests prove nothing."""
    errors = train_and_compare(cusyncbn.SingleProcessComm(), WORLD, "NCHW", "uneven", steps=1)
    return [] if errors else ["unsynced per-rank BN matched the global reference: the check cannot fail"]


@case
def one_collective_per_pass_and_none_in_eval():
    comm = CountingComm(make_comm(WORLD))
    bn = cusyncbn.SyncBatchNorm(4, comm=comm, device=LAYER_DEVICE)
    x = xp.asarray(np.random.default_rng(WORLD.rank).normal(size=(WORLD.rank + 1, 4, 3, 3)).astype("float32"))
    errors = []
    y = bn(x)
    if comm.calls != 2:                      # the layer's first: a first all-reduce finds the pivot
        errors.append(f"the first training forward made {comm.calls} all-reduces, expected 2")
    bn.backward(xp.ones_like(y))
    if comm.calls != 3:
        errors.append(f"training backward made {comm.calls - 2} all-reduces, expected 1")
    y = bn(x)
    if comm.calls != 4:
        errors.append(f"the second training forward made {comm.calls - 3} all-reduces, expected 1")
    bn.backward(xp.ones_like(y))
    if comm.calls != 5:
        errors.append(f"training backward made {comm.calls - 4} all-reduces, expected 1")
    bn.eval()
    if WORLD.rank == 0:                      # eval alone on one rank: must not wait for the others
        y = bn(x)
        bn.backward(xp.ones_like(y))
    if comm.calls != 5:
        errors.append(f"eval made {comm.calls - 5} all-reduces, expected 0")
    return errors


@case
def eval_matches_running_statistics():
    comm = make_comm(WORLD)
    bn = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE)
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, size=(9, 3, 4)).astype("float32")
    bn(xp.asarray(x[WORLD.rank::WORLD.size]))
    bn.eval()
    errors = []
    y = bn(xp.asarray(x))
    want = ref.eval_forward(x, np.ones(3), np.zeros(3), host(bn._mean), host(bn._variance), 1e-5, "NCL")
    close(errors, "eval y", y, want, "float32")
    return errors


@case
def all_ranks_empty():
    comm = make_comm(WORLD)
    bn = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE, data_format="NHWC")
    bn._mean[...] = 0.5
    x = xp.zeros((0, 4, 4, 3), dtype="float32")
    y = bn(x)
    dx = bn.backward(xp.zeros_like(y))
    errors = []
    if y.shape != x.shape or dx.shape != x.shape:
        errors.append(f"empty shapes y {y.shape} dx {dx.shape}, expected {x.shape}")
    if not (np.all(host(bn._mean) == 0.5) and np.all(host(bn._variance) == 1.0)):
        errors.append("running statistics changed although the global batch was empty")
    if not np.all(np.isfinite(host(bn.weight.grad))):
        errors.append("non-finite weight.grad after an empty batch")
    return errors


@case
def global_count_one_gives_bias():
    comm = make_comm(WORLD)
    bn = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE, data_format="NC")
    bn.bias.data[...] = xp.asarray([1.0, -2.0, 3.0])
    bn._mean[...] = xp.asarray([0.25, 10.0, -3.0])      # a non-zero shift must not spoil it
    n = 1 if WORLD.rank == WORLD.size - 1 else 0
    x = xp.asarray(np.full((n, 3), 7.3, dtype="float32"))
    y = bn(x)
    dx = bn.backward(xp.ones_like(y))
    errors = []
    if n and not np.array_equal(host(y), np.array([[1.0, -2.0, 3.0]], dtype="float32")):
        errors.append(f"y = {host(y)}, expected exactly the bias")
    if not (np.all(np.isfinite(host(dx))) and np.all(np.isfinite(host(bn._variance)))):
        errors.append("non-finite dx or running variance for a global count of one")
    return errors


@case
def lifo_forwards():
    comm = make_comm(WORLD)
    bn = cusyncbn.SyncBatchNorm(2, comm=comm, device=LAYER_DEVICE, data_format="NC")
    rng = np.random.default_rng(3)
    xa, xb, dya, dyb = (rng.normal(size=(8, 2)) for _ in range(4))
    mine = slice(WORLD.rank * 8 // WORLD.size, (WORLD.rank + 1) * 8 // WORLD.size)
    bn(xp.asarray(xa[mine]))
    bn(xp.asarray(xb[mine]))
    dxb = bn.backward(xp.asarray(dyb[mine]))
    dxa = bn.backward(xp.asarray(dya[mine]))
    errors = []
    close(errors, "second forward's dx", dxb, ref.backward(xb, dyb, np.ones(2), 1e-5, "NC")[0][mine], "float64")
    close(errors, "first forward's dx", dxa, ref.backward(xa, dya, np.ones(2), 1e-5, "NC")[0][mine], "float64")
    return errors


@case
def bad_input_raises_before_any_collective():
    comm = CountingComm(make_comm(WORLD))
    bn = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE)
    errors = []
    bad = [(xp.zeros((2, 4, 2, 2), "float32"), ValueError, "4 channels"),
           (xp.zeros((2, 3, 2, 2, 2, 2), "float32"), ValueError, "dimensions"),
           (xp.zeros((2, 3, 2, 2), "int32"), TypeError, "floating dtype")]
    for x, kind, words in bad:
        try:
            bn(x)
            errors.append(f"{x.shape}/{x.dtype}: no exception")
        except kind as exc:
            if words not in str(exc):
                errors.append(f"message {exc!s} lacks {words!r}")
    try:
        bn.backward(xp.zeros((2, 3), "float32"))
        errors.append("backward without pending forward: no exception")
    except RuntimeError:
        pass
    if comm.calls:
        errors.append(f"{comm.calls} collectives ran for bad input")
    return errors


def expect_raise(errors, what, fn, kind, words):
    """``fn()`` must raise ``kind`` with every one of ``words`` in its message."""
    try:
        fn()
        errors.append(f"{what}: no exception")
    except kind as exc:
        missing = [w for w in words if w not in str(exc)]
        if missing:
            errors.append(f"{what}: message lacks {missing}: {exc}")
    except Exception as exc:                             # noqa: BLE001 - reported, not raised
        errors.append(f"{what}: {type(exc).__name__} instead of {kind.__name__}: {exc}")


@case
def debug_mode_raises_on_every_rank():
    comm = make_comm(WORLD)
    errors = []
    bn = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE, debug=True, name="dbg")
    last = WORLD.size - 1
    mine = WORLD.rank == last
    # Bad input on one rank: that rank raises its own error, every other one a RuntimeError naming it.
    channels = 4 if mine else 3
    if mine:
        expect_raise(errors, "bad input here", lambda: bn(xp.zeros((2, channels, 2, 2), "float32")),
                     ValueError, ["4 channels"])
    else:
        expect_raise(errors, "bad input elsewhere", lambda: bn(xp.zeros((2, channels, 2, 2), "float32")),
                     RuntimeError, [f"[{last}]"])
    # Train/eval mismatch: named on every rank.
    bn.train() if not mine else bn.eval()
    expect_raise(errors, "train/eval mismatch", lambda: bn(xp.ones((2, 3, 2, 2), "float32")),
                 RuntimeError, ["mode", f"rank {last}: eval", "rank 0: train"])
    bn.train()
    # One rank calls backward with no pending forward while the others run the next forward.
    bn_b = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE, debug=True, name="dbg_b", data_format="NC")
    x = xp.ones((2, 3), "float32")
    if mine:
        expect_raise(errors, "backward without forward here", lambda: bn_b.backward(x),
                     RuntimeError, ["no pending forward"])
    else:
        expect_raise(errors, "forward meeting it elsewhere", lambda: bn_b(x), RuntimeError, [f"[{last}]"])
    y = bn_b(x)                                          # agreeing calls still work afterwards
    bn_b.backward(xp.ones_like(y))
    return errors


@case
def debug_mode_accepts_valid_differences():
    """Per-rank spatial sizes, input dtypes and default names may differ under debug."""
    comm = make_comm(WORLD)
    errors = []
    if WORLD.rank == 0:
        cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE)         # shifts this rank's default names
    bn = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE, debug=True, momentum=0.5)
    rng = np.random.default_rng(11)
    shapes = [(2 + r, 3, 2 + r, 5 - r % 3) for r in range(WORLD.size)]
    dtypes = ["float32" if r % 2 == 0 else "float64" for r in range(WORLD.size)]
    xs = [rng.normal(size=s) for s in shapes]
    dys = [rng.normal(size=s) for s in shapes]
    r = WORLD.rank
    try:
        y = bn(xp.asarray(xs[r].astype(dtypes[r])))
        dx = bn.backward(xp.asarray(dys[r].astype(dtypes[r])))
    except Exception as exc:                             # noqa: BLE001 - reported, not raised
        return [f"valid differences refused: {type(exc).__name__}: {exc}"]
    flat = np.concatenate([x.transpose(1, 0, 2, 3).reshape(3, -1) for x in xs], axis=1)
    mean, var = flat.mean(axis=1), flat.var(axis=1)
    want_y = (xs[r] - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    close(errors, "y", y, want_y, "float32")
    close(errors, "running mean", bn.running_mean, 0.5 * mean, "float32")
    if not np.all(np.isfinite(host(dx))):
        errors.append("dx not finite")
    return errors


@case
def skipped_batch_is_detected_on_every_rank():
    """A rank that catches a bad-input error and goes on is out of step: every rank raises at
    the next collective, and no running statistics are spoiled."""
    comm = make_comm(WORLD)
    errors = []
    bn = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE, data_format="NC")
    x = xp.asarray(np.random.default_rng(5).normal(size=(4, 3)))
    bn(x)
    bn.backward(xp.ones_like(x))
    before = host(bn.running_mean).copy()
    if WORLD.rank == WORLD.size - 1:
        try:
            bn(xp.zeros((4, 5)))                         # wrong channel count: raises here only
        except ValueError:
            pass                                          # ... and this rank skips the batch
    # (on the GPU the finding reaches the host asynchronously: flush_reports waits for it)
    expect_raise(errors, "step after the skipped batch", lambda: (bn(x), flush_reports()), RuntimeError,
                 ["out of step"])
    if not np.array_equal(host(bn.running_mean), before):
        errors.append("running statistics changed by a desynchronized step")
    return errors


@case
def nonfinite_statistics_leave_running_stats_and_warn():
    import warnings
    comm = make_comm(WORLD)
    errors = []
    bn = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE, data_format="NC", name="nf")
    x = np.random.default_rng(6).normal(size=(4, 3))
    if WORLD.rank == 0:
        x[1, 2] = np.nan                                   # one bad value on one rank, channel 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(xp.asarray(x))
        flush_reports()
    rm, rv = host(bn.running_mean), host(bn.running_var)
    if not any("not finite" in str(w.message) and "nf" in str(w.message) for w in caught):
        errors.append(f"no warning naming the layer: {[str(w.message) for w in caught]}")
    if not (np.isfinite(rm).all() and np.isfinite(rv).all()):
        errors.append(f"running statistics became non-finite: {rm} {rv}")
    if rm[2] != 0.0 or rv[2] != 1.0:
        errors.append("channel 2's running statistics changed")
    if rm[0] == 0.0:
        errors.append("finite channels were not updated")
    strict = cusyncbn.SyncBatchNorm(3, comm=comm, device=LAYER_DEVICE, data_format="NC", nonfinite="raise")
    expect_raise(errors, "nonfinite='raise'", lambda: (strict(xp.asarray(x)), flush_reports()), FloatingPointError,
                 ["not finite"])
    return errors


@case
def functional_matches_global_reference():
    """cusyncbn.functional on uneven and empty per-rank batches, every layout."""
    from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
    comm = CountingComm(make_comm(WORLD))
    errors = []
    rng = np.random.default_rng(21)
    c = 3
    for data_format in ref.CHANNEL_LAST:
        for split in ("uneven", "empty"):
            total = 2 * WORLD.size + 3
            counts = split_counts(total, WORLD.size, split)
            lo, hi = sum(counts[:WORLD.rank]), sum(counts[:WORLD.rank + 1])
            x = rng.normal(1.0, 2.0, size=global_shape(data_format, total, c))
            dy = rng.normal(size=x.shape)
            w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
            rm, rv = xp.zeros(c), xp.ones(c)
            wd, bd = xp.asarray(w), xp.asarray(b)
            y, ctx = sync_batch_norm(xp.asarray(x[lo:hi]), rm, rv, wd, bd, momentum=0.6, data_format=data_format,
                                     comm=comm)
            dx, dw, db = sync_batch_norm_backward(ctx, xp.asarray(dy[lo:hi]))
            y_ref, mean, var = ref.forward(x, w, b, 1e-5, data_format)
            dx_ref, dw_ref, db_ref = ref.backward(x, dy, w, 1e-5, data_format)
            rm_ref, rv_ref = ref.update_running(np.zeros(c), np.ones(c), mean, var, x.size // c, 0.6)
            grads = np.concatenate([host(dw), host(db)])
            WORLD.Allreduce(MPI.IN_PLACE, grads)
            where = f"{data_format}/{split}"
            for what, got, want in (("y", y, y_ref[lo:hi]), ("dx", dx, dx_ref[lo:hi]), ("dweight", grads[:c], dw_ref),
                                    ("dbias", grads[c:], db_ref), ("running mean", rm, rm_ref),
                                    ("running var", rv, rv_ref)):
                close(errors, f"{where} {what}", got, want, "float64")
    calls = comm.calls
    _, ctx = sync_batch_norm(xp.ones((2, c)), data_format="NC", comm=comm)
    dx, _, _ = sync_batch_norm_backward(ctx, xp.ones((2, c)), input_grad=False)
    # The forward: two all-reduces (no running statistics, so no pivot state); the backward: none.
    if dx is not None or comm.calls != calls + 2:
        errors.append(f"backward without input gradient: dx={dx!r}, {comm.calls - calls} collectives (want 2, "
                      "both the forward's)")
    return errors


@case
def fused_epilogue_matches_global_reference():
    """act="relu" with a residual, act="relu" alone and a residual alone (y = act(BN(x) + residual))
    on uneven and empty per-rank batches, every layout (and float32 / float16 in two), two
    training steps then an eval step: y, dx, dresidual, the parameter gradients summed over
    ranks and the running statistics against the float64 reference's fused forms on the
    global batch; the running statistics bitwise equal on every rank."""
    errors = []
    comm = make_comm(WORLD)
    runs = [(fmt, split, "float64") for fmt in ref.CHANNEL_LAST for split in ("uneven", "empty")]
    runs += [("NHWC", "uneven", "float32"), ("NCHW", "empty", "float32"), ("NCHW", "uneven", "float16")]
    for data_format, split, dtype in runs:
        for act, residual in (("relu", True), ("relu", False), (None, True)):
            total = 2 * WORLD.size + 3
            counts = split_counts(total, WORLD.size, split)
            lo, hi = sum(counts[:WORLD.rank]), sum(counts[:WORLD.rank + 1])
            c = 3
            shape = global_shape(data_format, total, c)
            rng = np.random.default_rng(41)
            pdtype = "float64" if dtype == "float64" else "float32"
            bn = cusyncbn.SyncBatchNorm(c, momentum=0.7, data_format=data_format, comm=comm, device=LAYER_DEVICE,
                                        dtype=pdtype, act=act)
            w, b = rng.uniform(0.5, 1.5, c).astype(pdtype), rng.normal(size=c).astype(pdtype)
            bn.weight.data[...] = xp.asarray(w)
            bn.bias.data[...] = xp.asarray(b)
            rm, rv = np.zeros(c), np.ones(c)
            for step in range(3):
                if step == 2:
                    bn.eval()
                x = rng.normal(0.5, 2.0, size=shape).astype(dtype)
                dy = rng.normal(size=shape).astype(dtype)
                r = rng.normal(size=shape).astype(dtype) if residual else None
                bn.clear_gradients()
                y = bn(xp.asarray(x[lo:hi]), None if r is None else xp.asarray(r[lo:hi]))
                grads = bn.backward(xp.asarray(dy[lo:hi]))
                dx, dr = grads if residual else (grads, None)
                if bn.training:
                    y_ref, mean, var = ref.fused_forward(x, w, b, bn.epsilon, data_format, r, act)
                    want = ref.fused_backward(x, dy, w, b, bn.epsilon, data_format, r, act)
                    rm, rv = ref.update_running(rm, rv, mean, var, x.size // c, 0.7)
                else:
                    y_ref = ref.fused_eval_forward(x, w, b, rm, rv, bn.epsilon, data_format, r, act)
                    want = ref.fused_eval_backward(x, dy, w, b, rm, rv, bn.epsilon, data_format, r, act)
                param_grads = np.concatenate([host(bn.weight.grad), host(bn.bias.grad)]).astype(np.float64)
                WORLD.Allreduce(MPI.IN_PLACE, param_grads)
                tag = f"{data_format}/{split}/{dtype} act={act} residual={residual} step {step}"
                close(errors, f"{tag} y", y, y_ref[lo:hi], dtype)
                close(errors, f"{tag} dx", dx, want[0][lo:hi], dtype)
                if residual:
                    close(errors, f"{tag} dresidual", dr, want[3][lo:hi], dtype)
                    if host(dr).dtype != np.dtype(dtype):
                        errors.append(f"{tag}: dresidual dtype {host(dr).dtype}")
                grad_tol = (1e-3, 1e-3 * np.sqrt(x.size)) if dtype == "float16" else None
                close(errors, f"{tag} sum over ranks of weight.grad", param_grads[:c], want[1], "float32", grad_tol)
                close(errors, f"{tag} sum over ranks of bias.grad", param_grads[c:], want[2], "float32", grad_tol)
                close(errors, f"{tag} running mean", bn._mean, rm, "float32")
                close(errors, f"{tag} running var", bn._variance, rv, "float32")
                if host(y).dtype != np.dtype(dtype) or host(dx).dtype != np.dtype(dtype):
                    errors.append(f"{tag}: output dtype {host(y).dtype}/{host(dx).dtype} != {dtype}")
            stats = np.concatenate([host(bn._mean), host(bn._variance)])
            if any(s != stats.tobytes() for s in WORLD.allgather(stats.tobytes())):
                errors.append(f"{data_format}/{split}/{dtype} act={act}: running statistics differ bitwise between "
                              "ranks")
    return errors


@case
def functional_fused_epilogue_matches_global_reference():
    """cusyncbn.functional with activation="relu" and / or a residual (y = act(BN(x) + residual))
    on uneven and empty per-rank batches: two training steps (the first finds the pivot) and an
    eval step, dresidual into a new array and into residual_grad_out: y, dx, dresidual, dweight
    and dbias summed over ranks and the running statistics against the reference's fused forms
    on the global batch; one all-reduce per pass (two on a first forward), none in eval, none
    for dresidual alone (input_grad=False)."""
    from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
    comm = CountingComm(make_comm(WORLD))
    errors = []
    rng = np.random.default_rng(23)
    c = 3
    for data_format in ("NCHW", "NHWC", "NC"):
        for split in ("uneven", "empty"):
            total = 2 * WORLD.size + 3
            counts = split_counts(total, WORLD.size, split)
            lo, hi = sum(counts[:WORLD.rank]), sum(counts[:WORLD.rank + 1])
            shape = global_shape(data_format, total, c)
            for activation, residual in (("relu", True), ("relu", False), (None, True)):
                w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
                rm, rv, wd, bd = xp.zeros(c), xp.ones(c), xp.asarray(w), xp.asarray(b)
                rm_ref, rv_ref = np.zeros(c), np.ones(c)
                for step, training in enumerate((True, True, False)):
                    x, dy = rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape)
                    r = rng.normal(size=shape) if residual else None
                    where = f"{data_format}/{split} activation={activation} residual={residual} step {step}"
                    calls = comm.calls
                    y, ctx = sync_batch_norm(xp.asarray(x[lo:hi]), rm, rv, wd, bd, training=training, momentum=0.6,
                                             data_format=data_format, comm=comm, activation=activation,
                                             residual=None if r is None else xp.asarray(r[lo:hi]))
                    out = xp.empty(x[lo:hi].shape) if residual and step == 1 else None
                    grads = sync_batch_norm_backward(ctx, xp.asarray(dy[lo:hi]), residual_grad_out=out)
                    if training:
                        y_ref, mean, var = ref.fused_forward(x, w, b, 1e-5, data_format, r, activation)
                        want = ref.fused_backward(x, dy, w, b, 1e-5, data_format, r, activation)
                        rm_ref, rv_ref = ref.update_running(rm_ref, rv_ref, mean, var, x.size // c, 0.6)
                    else:
                        y_ref = ref.fused_eval_forward(x, w, b, rm_ref, rv_ref, 1e-5, data_format, r, activation)
                        want = ref.fused_eval_backward(x, dy, w, b, rm_ref, rv_ref, 1e-5, data_format, r, activation)
                    sums = np.concatenate([host(grads[1]), host(grads[2])])
                    WORLD.Allreduce(MPI.IN_PLACE, sums)
                    checks = [("y", y, y_ref[lo:hi]), ("dx", grads[0], want[0][lo:hi]), ("dweight", sums[:c], want[1]),
                              ("dbias", sums[c:], want[2]), ("running mean", rm, rm_ref), ("running var", rv, rv_ref)]
                    if residual:
                        checks.append(("dresidual", grads[3], want[3][lo:hi]))
                        if out is not None and grads[3] is not out:
                            errors.append(f"{where}: dresidual is not residual_grad_out")
                    for what, got, wanted in checks:
                        close(errors, f"{where} {what}", got, wanted, "float64")
                    made = comm.calls - calls
                    if made != (0 if not training else 3 if step == 0 else 2) or len(grads) != 3 + residual:
                        errors.append(f"{where}: {made} all-reduces and {len(grads)} results")
            x, dy, r = (rng.normal(size=shape) for _ in range(3))
            _, ctx = sync_batch_norm(xp.asarray(x[lo:hi]), xp.zeros(c), xp.ones(c), data_format=data_format, comm=comm,
                                     activation="relu", residual=xp.asarray(r[lo:hi]))
            calls = comm.calls
            dx, dw, db, dr = sync_batch_norm_backward(ctx, xp.asarray(dy[lo:hi]), input_grad=False, weight_grad=False,
                                                      bias_grad=False)
            if dx is not None or dw is not None or db is not None or comm.calls != calls:
                errors.append(f"{data_format}/{split} dresidual alone: {comm.calls - calls} all-reduces, "
                              f"dx={dx is not None}, dweight={dw is not None}, dbias={db is not None}")
            want = ref.fused_backward(x, dy, 1.0, 0.0, 1e-5, data_format, r, "relu")[3]
            close(errors, f"{data_format}/{split} dresidual alone", dr, want[lo:hi], "float64")
    return errors


@case
def allreduce_gradients_sums_and_averages():
    comm = make_comm(WORLD)
    a = xp.full((3,), float(WORLD.rank + 1))
    p = cusyncbn.Parameter(xp.zeros(2, "float32"), "p")
    p.grad = xp.full((2,), 2.0, dtype="float32")
    cusyncbn.allreduce_gradients([a, p], comm=comm)
    want = WORLD.size * (WORLD.size + 1) / 2
    errors = []
    close(errors, "summed array", a, np.full(3, want), "float64")
    close(errors, "summed Parameter.grad", p.grad, np.full(2, 2.0 * WORLD.size), "float32")
    cusyncbn.allreduce_gradients([a], comm=comm, op="mean")
    close(errors, "averaged array", a, np.full(3, want), "float64")
    return errors


@case
def torch_converted_model_matches_torch_on_whole_batch():
    """A torch conv+BN+ReLU stack converted by cusyncbn.torch, trained on uneven slices,
    equals torch.nn.BatchNorm*d trained on the whole batch (outputs, dx, grads, buffers)."""
    import copy

    import torch
    import cusyncbn.torch as cbt
    errors = []
    counts = split_counts(2 * WORLD.size + 3, WORLD.size, "uneven")
    lo, hi = sum(counts[:WORLD.rank]), sum(counts[:WORLD.rank + 1])
    for dim, channels_last in ((1, False), (2, False), (2, True), (3, False)):
        conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dim]
        bn = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dim]
        torch.manual_seed(0)
        ref = torch.nn.Sequential(conv(2, 4, 3, padding=1), bn(4), torch.nn.ReLU(), conv(4, 3, 1),
                                  bn(3, momentum=None)).double()
        ours = cbt.convert_sync_batchnorm(copy.deepcopy(ref))
        opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, ours)]
        for step in range(3):
            x = torch.randn((sum(counts), 2) + (5,) * dim, dtype=torch.float64)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            mine = x[lo:hi].clone().requires_grad_()
            whole = x.clone().requires_grad_()
            weights = torch.randn(x.shape[:1] + (3,) + x.shape[2:], dtype=torch.float64)
            for opt in opts:
                opt.zero_grad()
            y_ref = ref(whole)
            (y_ref * weights).sum().backward()
            y = ours(mine)
            (y * weights[lo:hi]).sum().backward()
            cusyncbn.allreduce_gradients([p.grad.numpy() for p in ours.parameters()], comm=make_comm(WORLD))
            for opt in opts:
                opt.step()
            tag = f"{dim}d{' channels_last' if channels_last else ''} step {step}"
            close(errors, f"{tag} y", y.detach().numpy(), y_ref.detach()[lo:hi].numpy(), "float64")
            close(errors, f"{tag} dx", mine.grad.numpy(), whole.grad[lo:hi].numpy(), "float64")
        for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
            close(errors, f"{dim}d {name}", b.double().numpy(), a.double().numpy(), "float64")
    return errors


def nccl_refused(what, why):
    """Errors unless building an NCCLComm raises a RuntimeError that says ``why``."""
    try:
        cusyncbn.NCCLComm(WORLD)
    except RuntimeError as exc:
        return [] if why in str(exc) else [f"{what}: the error does not say why: {exc}"]
    return [f"{what}: did not raise"]


@case
def nccl_bootstrap_and_fallback():
    """NCCLComm's control logic with a fake CuPy (tests/fake_cupy.py): the unique id of rank 0
    reaches every rank; ranks sharing a GPU make NCCLComm raise on every rank and the default
    path fall back to MPIComm with a one-line warning saying why; so does a CuPy without NCCL."""
    import warnings

    import fake_cupy
    from cusyncbn import _nccl
    errors = []
    rank, size = WORLD.rank, WORLD.size
    hostid = os.environ.pop("NCCL_HOSTID", None)
    try:
        with fake_cupy.installed(rank):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                comm = _nccl.nccl_or_fallback(WORLD, "gpu:0")
            said = [str(w.message) for w in caught]
            if not isinstance(comm, cusyncbn.MPIComm) or comm.size != size:
                errors.append(f"one GPU for {size} ranks: got {comm!r}, expected the MPIComm fallback")
            if len(said) != 1 or "share one GPU" not in said[0] or "\n" in said[0]:
                errors.append(f"fallback warning: {said}")
            errors += nccl_refused("NCCLComm asked for explicitly on a shared GPU", "share one GPU")
            os.environ["NCCL_HOSTID"] = f"host{rank}"      # as the GPU test launcher does
            comm = cusyncbn.NCCLComm(WORLD)
            inner = comm._comm
            if (inner.size, inner.uid, inner.rank) != (size, ("unique id made by rank", 0), rank):
                errors.append(f"NCCL bootstrap: communicator built with {(inner.size, inner.uid, inner.rank)}")
        with fake_cupy.installed(rank, nccl_available=rank != 0):
            errors += nccl_refused("NCCLComm without NCCL on rank 0", "without NCCL")
    finally:
        os.environ.pop("NCCL_HOSTID", None)
        if hostid is not None:
            os.environ["NCCL_HOSTID"] = hostid
    return errors


def gpu_case(fn):
    """A case that needs CUDA (run by tests/test_gpu.py only)."""
    GPU_CASES[fn.__name__] = fn
    return fn


@gpu_case
def torch_syncbatchnorm_numerics():
    """cusyncbn.torch (synced by cusyncbn's NCCLComm) against torch.nn.SyncBatchNorm (synced
    by a torch.distributed NCCL group) on the same uneven per-rank data: outputs, dx,
    parameter gradients and running statistics over three SGD steps.

    The batch norms are compared alone (BN -> ReLU -> BN) on the same input tensors, since a
    convolution in front would add its own rounding; TF32 (torch's default for float32
    convolutions and matmuls on Ampere and newer, ~1e-3 off) is switched off all the same."""
    import copy
    import socket

    import torch
    import torch.distributed as dist
    import cusyncbn.torch as cbt
    if DEVICE != "gpu":
        return ["torch.nn.SyncBatchNorm needs CUDA: run this case with the gpu device"]
    if WORLD.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        port = None
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(WORLD.bcast(port)))
    torch.cuda.set_device(0)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl", rank=WORLD.rank, world_size=WORLD.size)
    counts = split_counts(4 * WORLD.size + 3, WORLD.size, "uneven")
    lo, hi = sum(counts[:WORLD.rank]), sum(counts[:WORLD.rank + 1])
    errors = []
    try:
        for dtype, channels_last in ((torch.float32, False), (torch.float32, True), (torch.float64, False)):
            torch.manual_seed(0)
            base = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                       torch.nn.BatchNorm2d(8, momentum=0.3)).to("cuda", dtype)
            with torch.no_grad():
                for bn in (base[0], base[2]):
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.normal_()
            theirs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
            ours = cbt.convert_sync_batchnorm(copy.deepcopy(base))
            opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (theirs, ours)]
            tol = "float64" if dtype == torch.float64 else "float32"
            for step in range(3):
                x = (torch.randn((sum(counts), 8, 6, 7), dtype=dtype, device="cuda") * 2 + 1)[lo:hi]
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                weights = torch.randn((hi - lo, 8, 6, 7), dtype=dtype, device="cuda")
                outs = []
                for model, opt in zip((theirs, ours), opts):
                    opt.zero_grad()
                    xx = x.clone().requires_grad_()
                    y = model(xx)
                    (y * weights).sum().backward()
                    opt.step()
                    outs.append([y.detach(), xx.grad] + [p.grad for p in model.parameters()])
                tag = f"{dtype} channels_last={channels_last} step {step}"
                for i, (a, b) in enumerate(zip(*outs)):
                    close(errors, f"{tag} output {i}", b.double().cpu().numpy(), a.double().cpu().numpy(), tol,
                          (1e-4, 1e-4) if tol == "float32" else None)
            for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
                close(errors, f"{dtype} channels_last={channels_last} {name}", b.double().cpu().numpy(),
                      a.double().cpu().numpy(), tol, (1e-4, 1e-4) if tol == "float32" else None)
    finally:
        dist.destroy_process_group()
    return errors


def main():
    name = sys.argv[1]
    if name == "--list":                 # the registry, for tests/test_mpi.py to compare with tests/mpi_cases.py
        print("RESULT " + json.dumps({"size": WORLD.size, "cpu": list(CASES), "gpu": list(GPU_CASES)}), flush=True)
        return
    errors = {**CASES, **GPU_CASES}[name]()
    if EMULATED is not None and not EMULATED.launches:
        errors.append("the emulated GPU backend launched no kernel")
    gathered = WORLD.gather([f"rank {WORLD.rank}: {e}" for e in errors], root=0)
    if WORLD.rank == 0:
        flat = [e for rank_errors in gathered for e in rank_errors]
        print("RESULT " + json.dumps({"case": name, "size": WORLD.size, "errors": flat}), flush=True)


if __name__ == "__main__":
    main()
