"""Multi-rank cases for cusyncbn.paddle, run by tests/test_paddle.py as

    mpiexec -n N python -m mpi4py tests/paddle_worker.py CASE [CASE ...]

Importing Paddle takes a while, so one launch runs every case named. Every rank
builds the same global batch from a seed and keeps its own (uneven, possibly empty)
slice; results are compared with the float64 reference or with one process holding
the whole batch. Failures are collected, never asserted, until every collective is
done; then rank 0 prints one line ``RESULT {json}`` with each case's errors.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(__file__))
_argv, sys.argv = sys.argv, sys.argv[:1]            # mpi_worker reads a device from argv[2]
import mpi_worker as mw  # noqa: E402
sys.argv = _argv
import reference as ref  # noqa: E402

import paddle  # noqa: E402

import cusyncbn  # noqa: E402
import cusyncbn.paddle as cbp  # noqa: E402

warnings.filterwarnings("ignore", message="When training, we now always track")   # Paddle's BatchNorm*D
WORLD = MPI.COMM_WORLD
CASES = {}
MOMENTUM = 0.75            # exact in float32: Paddle keeps momentum as a float32 attribute
EPS = 1e-5


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def my_slice(total, split):
    counts = mw.split_counts(total, WORLD.size, split)
    return slice(sum(counts[:WORLD.rank]), sum(counts[:WORLD.rank + 1]))


def layer_against_reference(data_format, split, dtype, comm):
    """Three training steps of one layer on this rank's slice against the global reference."""
    paddle.set_default_dtype(dtype)
    total = 2 * WORLD.size + 3
    part = my_slice(total, split)
    shape = mw.global_shape(data_format, total)
    c = 3
    rng = np.random.default_rng(7)
    w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    bn = cbp.SyncBatchNorm(c, momentum=MOMENTUM, data_format=data_format, comm=comm)
    bn.weight.set_value(paddle.to_tensor(w.astype(dtype)))
    bn.bias.set_value(paddle.to_tensor(b.astype(dtype)))
    w, b = bn.weight.numpy().astype(np.float64), bn.bias.numpy().astype(np.float64)
    rm, rv = np.zeros(c), np.ones(c)
    errors = []
    for step in range(3):
        x = rng.normal(2.0, 3.0, size=shape).astype(dtype)
        dy = rng.normal(size=shape).astype(dtype)
        xt = paddle.to_tensor(x[part], stop_gradient=False)
        y = bn(xt)
        (y * paddle.to_tensor(dy[part])).sum().backward()
        cbp.allreduce_gradients(bn.parameters(), comm=comm)
        y_ref, mean, var = ref.forward(x, w, b, bn._epsilon, data_format)
        dx_ref, dw_ref, db_ref = ref.backward(x, dy, w, bn._epsilon, data_format)
        rm, rv = ref.update_running(rm, rv, mean, var, x.size // c, MOMENTUM)
        for what, got, want in (("y", y, y_ref[part]), ("x.grad", xt.grad, dx_ref[part]),
                                ("sum of weight.grad", bn.weight.grad, dw_ref), ("sum of bias.grad", bn.bias.grad, db_ref),
                                ("running mean", bn._mean, rm), ("running var", bn._variance, rv)):
            mw.close(errors, f"step {step} {what}", got.numpy(), want, dtype)
        bn.clear_gradients()
    return errors


@case
def layer_uneven_and_empty_batches():
    """Every data format, uneven and empty per-rank batches, float64 and float32; the
    default communicator, an mpi4py one and a cusyncbn one."""
    errors = []
    comms = {"default": None, "mpi4py": WORLD, "MPIComm": cusyncbn.MPIComm(WORLD)}
    for i, data_format in enumerate(ref.CHANNEL_LAST):
        for split in ("uneven", "empty"):
            for dtype in ("float64", "float32") if data_format in ("NCHW", "NLC") else ("float64",):
                name = list(comms)[i % len(comms)]
                errors += [f"{data_format}/{split}/{dtype}/comm {name}: {e}"
                           for e in layer_against_reference(data_format, split, dtype, comms[name])]
    return errors


@case
def fused_epilogue_uneven_batches():
    """act="relu" and a residual (relu(BN(x) + residual)), and a residual alone, on uneven and
    empty per-rank batches in four layouts, training then eval: y, x.grad, residual.grad, the
    parameter gradients summed over ranks and the running statistics against the float64
    reference's fused forms on the global batch."""
    paddle.set_default_dtype("float64")
    errors = []
    comm = cusyncbn.MPIComm(WORLD)
    for data_format in ("NCHW", "NHWC", "NC", "NCL"):
        for split in ("uneven", "empty"):
            for act, residual in (("relu", True), ("relu", False), (None, True)):
                total = 2 * WORLD.size + 3
                part = my_slice(total, split)
                shape = mw.global_shape(data_format, total)
                rng = np.random.default_rng(31)
                bn = cbp.SyncBatchNorm(3, momentum=MOMENTUM, data_format=data_format, comm=comm, act=act)
                w, b = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
                bn.weight.set_value(paddle.to_tensor(w))
                bn.bias.set_value(paddle.to_tensor(b))
                rm, rv = np.zeros(3), np.ones(3)
                for step in range(3):
                    if step == 2:
                        bn.eval()
                    x, dy = rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape)
                    r = rng.normal(size=shape) if residual else None
                    xt = paddle.to_tensor(x[part], stop_gradient=False)
                    rt = paddle.to_tensor(r[part], stop_gradient=False) if residual else None
                    y = bn(xt, rt)
                    (y * paddle.to_tensor(dy[part])).sum().backward()
                    cbp.allreduce_gradients(bn.parameters(), comm=comm)
                    if bn.training:
                        y_ref, mean, var = ref.fused_forward(x, w, b, EPS, data_format, r, act)
                        want = ref.fused_backward(x, dy, w, b, EPS, data_format, r, act)
                        rm, rv = ref.update_running(rm, rv, mean, var, x.size // 3, MOMENTUM)
                    else:
                        y_ref = ref.fused_eval_forward(x, w, b, rm, rv, EPS, data_format, r, act)
                        want = ref.fused_eval_backward(x, dy, w, b, rm, rv, EPS, data_format, r, act)
                    tag = f"{data_format}/{split} act={act} residual={residual} step {step}"
                    checks = [("y", y, y_ref[part]), ("x.grad", xt.grad, want[0][part]),
                              ("sum of weight.grad", bn.weight.grad, want[1]),
                              ("sum of bias.grad", bn.bias.grad, want[2]), ("running mean", bn._mean, rm),
                              ("running var", bn._variance, rv)]
                    if residual:
                        checks.append(("residual.grad", rt.grad, want[3][part]))
                    for what, got, expected in checks:
                        mw.close(errors, f"{tag} {what}", got.numpy(), expected, "float64")
                    bn.clear_gradients()
    return errors


@case
def collectives_only_where_needed():
    """One all-reduce per training forward, one per backward only when x needs a gradient,
    none in eval or for use_global_stats=True."""
    paddle.set_default_dtype("float32")
    comm = mw.CountingComm(cusyncbn.MPIComm(WORLD))
    bn = cbp.SyncBatchNorm(4, comm=comm)
    x = paddle.randn([WORLD.rank + 1, 4, 3, 3])
    with paddle.no_grad():
        bn(x)                           # a layer's first training forward may cost more
    errors = []

    def expect(what, calls, run):
        before = comm.calls
        run()
        if comm.calls - before != calls:
            errors.append(f"{what}: {comm.calls - before} all-reduces, expected {calls}")

    expect("forward with x.stop_gradient", 1, lambda: bn(x).sum().backward())
    if bn.weight.grad is None:
        errors.append("weight.grad missing after a backward with x.stop_gradient")
    xg = x.detach()
    xg.stop_gradient = False
    expect("forward + backward with x.grad", 2, lambda: bn(xg).sum().backward())
    with paddle.no_grad():
        expect("forward under no_grad", 1, lambda: bn(xg))
    bn.eval()
    expect("eval forward + backward", 0, lambda: bn(xg).sum().backward())
    bn.train()
    bn._use_global_stats = True
    expect("use_global_stats forward + backward", 0, lambda: bn(xg).sum().backward())
    return errors


@case
def bfloat16_uneven_batches():
    """bfloat16 input (float32 parameters and statistics, as Paddle's 16-bit kernels) on uneven
    and empty per-rank batches: y and x.grad are the global reference rounded to bfloat16."""
    paddle.set_default_dtype("float32")
    errors = []
    for split in ("uneven", "empty"):
        total = 2 * WORLD.size + 3
        part = my_slice(total, split)
        rng = np.random.default_rng(21)
        bn = cbp.SyncBatchNorm(3, momentum=MOMENTUM)
        rm, rv = np.zeros(3), np.ones(3)
        for step in range(2):
            x = paddle.to_tensor(rng.normal(3.0, 2.0, size=(total, 3, 2, 2)).astype("float32")).astype("bfloat16")
            dy = paddle.to_tensor(rng.normal(size=(total, 3, 2, 2)).astype("float32")).astype("bfloat16")
            x64, dy64 = (t.astype("float32").numpy().astype(np.float64) for t in (x, dy))
            xs = x[part].detach()
            xs.stop_gradient = False
            y = bn(xs)
            (y.astype("float32") * dy[part].astype("float32")).sum().backward()
            y_ref, mean, var = ref.forward(x64, 1.0, 0.0, EPS, "NCHW")
            dx_ref = ref.backward(x64, dy64, 1.0, EPS, "NCHW")[0]
            rm, rv = ref.update_running(rm, rv, mean, var, x64.size // 3, MOMENTUM)
            if y.dtype != paddle.bfloat16 or xs.grad.dtype != paddle.bfloat16:
                errors.append(f"{split} step {step}: y {y.dtype}, x.grad {xs.grad.dtype}")
            for what, got, want in (("y", y, y_ref[part]), ("x.grad", xs.grad, dx_ref[part])):
                got = got.astype("float32").numpy().astype(np.float64)
                if not np.all(np.abs(got - want) <= 2.0 ** -8 * np.abs(want) + 1e-5):
                    errors.append(f"{split} step {step} {what}: max abs err {np.max(np.abs(got - want), initial=0):.3g}")
            for what, got, want in (("running mean", bn._mean, rm), ("running var", bn._variance, rv)):
                mw.close(errors, f"{split} step {step} {what}", got.numpy(), want, "float32")
            bn.clear_gradients()
    return errors


@case
def one_value_in_the_global_batch():
    """One sample in the whole global batch (on the last rank; the others hold none): as
    Paddle's SyncBatchNorm kernel, y = bias and the running statistics move on every rank."""
    paddle.set_default_dtype("float64")
    bn = cbp.SyncBatchNorm(3, momentum=MOMENTUM, data_format="NC")
    bias = np.array([0.5, -1.0, 2.0])
    bn.bias.set_value(paddle.to_tensor(bias))
    x = np.array([[1.0, -2.0, 30.0]])
    mine = x if WORLD.rank == WORLD.size - 1 else x[:0]
    y = bn(paddle.to_tensor(mine))
    y_ref, mean, var = ref.forward(x, 1.0, bias, EPS, "NC")
    rm, rv = ref.update_running(np.zeros(3), np.ones(3), mean, var, 1, MOMENTUM)
    errors = []
    mw.close(errors, "y", y.numpy(), y_ref[:len(mine)], "float64")
    mw.close(errors, "running mean", bn._mean.numpy(), rm, "float64")
    mw.close(errors, "running var", bn._variance.numpy(), rv, "float64")
    return errors


@case
def eval_on_one_rank_alone():
    """Validation on rank 0 only: eval makes no collective, so the other ranks do not wait
    and the next training step still pairs every rank's collectives."""
    paddle.set_default_dtype("float64")
    bn = cbp.SyncBatchNorm(3, momentum=MOMENTUM)
    rng = np.random.default_rng(22)
    x = rng.normal(size=(2 * WORLD.size, 3, 2, 2))
    part = my_slice(len(x), "uneven")
    bn(paddle.to_tensor(x[part]))                       # a training step together
    errors = []
    if WORLD.rank == 0:
        bn.eval()
        for _ in range(3):
            y = bn(paddle.to_tensor(x))
        mw.close(errors, "eval y", y.numpy(), ref.eval_forward(x, 1.0, 0.0, bn._mean.numpy(), bn._variance.numpy(),
                                                                EPS, "NCHW"), "float64")
        bn.train()
    x2 = rng.normal(size=x.shape)
    y = bn(paddle.to_tensor(x2[part]))                  # together again
    mw.close(errors, "training y after", y.numpy(), ref.forward(x2, 1.0, 0.0, EPS, "NCHW")[0][part], "float64")
    return errors


@case
def frozen_converted_layer_makes_no_collective():
    """A BatchNorm2D with use_global_stats=True converted: every rank normalizes with the
    running statistics in training, with no all-reduce forward or backward."""
    paddle.set_default_dtype("float64")
    comm = mw.CountingComm(cusyncbn.MPIComm(WORLD))
    bn = cbp.convert_sync_batchnorm(paddle.nn.BatchNorm2D(3, use_global_stats=True), comm=comm)
    bn._mean.set_value(paddle.to_tensor([1.0, -1.0, 0.5]))
    x = paddle.to_tensor(np.random.default_rng(23).normal(size=(WORLD.rank + 1, 3, 2, 2)), stop_gradient=False)
    y = bn(x)
    y.sum().backward()
    errors = []
    mw.close(errors, "y", y.numpy(), ref.eval_forward(x.numpy(), 1.0, 0.0, bn._mean.numpy(), 1.0, EPS, "NCHW"),
             "float64")
    if comm.calls:
        errors.append(f"{comm.calls} all-reduces, expected none")
    return errors


def make_cnn():
    paddle.seed(3)
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 6, 3, padding=1), paddle.nn.BatchNorm2D(6, momentum=MOMENTUM), paddle.nn.ReLU(),
        paddle.nn.Conv2D(6, 5, 1), paddle.nn.BatchNorm2D(5, momentum=0.5), paddle.nn.ReLU(),
        paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(5, 3))


def train(model, x, labels, part, total, steps, distributed):
    """SGD on a loss that is a sum over the global batch / total: per step the (global) loss,
    this slice's logits and input gradient."""
    opt = paddle.optimizer.SGD(learning_rate=0.2, parameters=model.parameters())
    out = []
    for step in range(steps):
        xs = paddle.to_tensor(x[step][part], stop_gradient=False)
        logits = model(xs)
        loss = paddle.nn.functional.cross_entropy(logits, paddle.to_tensor(labels[step][part]),
                                                  reduction="sum") / total
        loss.backward()
        if distributed:
            cbp.allreduce_gradients(model.parameters())
        opt.step()
        opt.clear_grad()
        value = WORLD.allreduce(float(loss)) if distributed else float(loss)
        out.append((value, logits.numpy(), xs.grad.numpy()))
    return out


def compare_training(errors, tag, ours, theirs, part, model, reference):
    for step, ((l1, y1, g1), (l2, y2, g2)) in enumerate(zip(ours, theirs)):
        mw.close(errors, f"{tag} step {step} loss", np.array(l1), np.array(l2), "float64")
        mw.close(errors, f"{tag} step {step} logits", y1, y2[part], "float64")
        mw.close(errors, f"{tag} step {step} x.grad", g1, g2[part], "float64")
    mine = model.state_dict()
    for name, value in reference.state_dict().items():
        mw.close(errors, f"{tag} {name} after training", mine[name].numpy(), value.numpy(), "float64")


@case
def converted_cnn_matches_one_process():
    """A converted Paddle CNN trained on uneven (and empty) slices equals the same CNN trained
    in one process on the whole batch; unconverted (local BatchNorm2D) it does not."""
    paddle.set_default_dtype("float64")
    total, steps = 3 * WORLD.size + 2, 3
    rng = np.random.default_rng(11)
    x = rng.normal(size=(steps, total, 3, 6, 6))
    labels = rng.integers(0, 3, size=(steps, total))
    whole = slice(0, total)
    reference = make_cnn()
    expected = train(reference, x, labels, whole, total, steps, distributed=False)
    errors = []
    for split in ("uneven", "empty"):
        part = my_slice(total, split)
        model = cbp.SyncBatchNorm.convert_sync_batchnorm(make_cnn())
        kinds = [type(m) for m in model.sublayers()]
        if kinds.count(cbp.SyncBatchNorm) != 2 or paddle.nn.BatchNorm2D in kinds:
            errors.append(f"{split}: conversion gave {kinds}")
        compare_training(errors, split, train(model, x, labels, part, total, steps, True), expected, part, model,
                         reference)
    part = my_slice(total, "uneven")
    local = make_cnn()
    control = []
    compare_training(control, "control", train(local, x, labels, part, total, steps, True), expected, part, local,
                     reference)
    if not WORLD.allreduce(len(control)):
        errors.append("negative control: local BatchNorm2D per rank matched the one-process run "
                      "(the comparison cannot fail)")
    return errors


def main():
    names = sys.argv[1:]
    results = {}
    for name in names:
        errors = CASES[name]()
        results[name] = WORLD.gather([f"rank {WORLD.rank}: {e}" for e in errors], root=0)
    if WORLD.rank == 0:
        flat = {name: [e for rank_errors in gathered for e in rank_errors] for name, gathered in results.items()}
        print("RESULT " + json.dumps({"size": WORLD.size, "cases": flat}), flush=True)


if __name__ == "__main__":
    main()
