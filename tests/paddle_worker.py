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
