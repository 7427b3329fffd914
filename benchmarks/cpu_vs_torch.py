"""CPU speed: cusyncbn's NumPy path against PyTorch's CPU batch norm, forward + backward.

Launch (from a checkout, after ``pip install -e ".[mpi,torch]"``):
    .venv/bin/python benchmarks/cpu_vs_torch.py [--reps 20] [--dtypes float32 float64] [--shapes 8,64,32,32 ...]
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/cpu_vs_torch.py      # 2 ranks, synced

For every shape and dtype it times a training forward (``y = bn(x)``) and its backward
(``bn.backward(dy)``: dx and the weight/bias gradients) of ``cusyncbn.SyncBatchNorm`` on
NumPy arrays, and the same of ``torch.nn.functional.batch_norm`` on CPU tensors (forward
recording the graph, then ``torch.autograd.grad`` for dx, dweight, dbias), and prints the
medians as a markdown table. torch is timed with its default thread count and with one
thread (NumPy's element-wise passes run on one). Before timing, one process checks that
both compute the same y and dx.

Under ``mpiexec -n R`` each rank holds a batch of the given shape and cusyncbn syncs the
statistics over all ranks (one all-reduce per pass, as in training); torch's batch norm
runs per rank, unsynced (what each rank would pay without synchronization), with one
thread per rank. Each repetition starts at a barrier and counts the slowest rank.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

import cusyncbn

SHAPES = [(2, 64, 8, 8), (8, 64, 32, 32), (32, 256, 14, 14), (64, 1024, 7, 7)]


def world():
    """(rank, size, mpi4py communicator or None for a single process)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return (comm.rank, comm.size, comm) if comm.size > 1 else (0, 1, None)


def timed(jobs, reps, comm):
    """Median seconds of each job's ``fn`` over ``reps`` rounds (the slowest rank's, under MPI).

    ``jobs`` maps a key to ``(fn, before, after)``; ``before`` and ``after`` (or None) run untimed
    around each call (a forward before a timed backward, a backward after a timed forward). Every
    round times every job once, in an order rotated per round, so that a load that comes and goes on
    a shared machine falls on all of them alike.
    """
    keys = list(jobs)
    times = {key: [] for key in keys}
    for round_ in range(reps):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            fn, before, after = jobs[key]
            if before is not None:
                before()
            if comm is not None:
                comm.Barrier()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if after is not None:
                after()
            times[key].append(max(comm.allgather(elapsed)) if comm is not None else elapsed)
    return {key: statistics.median(values) for key, values in times.items()}


def with_threads(torch, n, fn=None):
    """``fn`` (or nothing) after setting torch's thread count to ``n``, untimed."""
    def run():
        torch.set_num_threads(n)
        if fn is not None:
            fn()
    return run


def cusyncbn_case(x, dy):
    bn = cusyncbn.SyncBatchNorm(x.shape[1], data_format="NCHW", device="cpu", dtype=x.dtype.name)
    state = {}

    def forward():
        state["y"] = bn(x)

    def backward():
        state["dx"] = bn.backward(dy)

    def step():
        forward()
        backward()
    step()                                           # the layer's first call makes two all-reduces
    return state, forward, backward, step


def torch_case(torch, x, dy):
    tx = torch.from_numpy(x).requires_grad_()
    tdy = torch.from_numpy(dy)
    channels = x.shape[1]
    weight = torch.ones(channels, dtype=tx.dtype, requires_grad=True)
    bias = torch.zeros(channels, dtype=tx.dtype, requires_grad=True)
    running_mean, running_var = torch.zeros(channels, dtype=tx.dtype), torch.ones(channels, dtype=tx.dtype)
    state = {}

    def forward():
        state["y"] = torch.nn.functional.batch_norm(tx, running_mean, running_var, weight, bias, training=True,
                                                    momentum=0.1, eps=1e-5)

    def backward():
        state["dx"], _, _ = torch.autograd.grad(state.pop("y"), (tx, weight, bias), tdy)

    def step():
        forward()
        backward()
    return state, forward, backward, step


def check_same(x, dy, torch):
    """y and dx of both on one batch: they must compute the same thing before they are compared."""
    ours, _, _, _ = cusyncbn_case(x, dy)
    theirs, forward, backward, _ = torch_case(torch, x, dy)
    forward()
    y = theirs["y"].detach().numpy()
    backward()
    tol = 1e-3 if x.dtype == np.float32 else 1e-9
    for name, a, b in (("y", ours["y"], y), ("dx", ours["dx"], theirs["dx"].numpy())):
        err = float(np.max(np.abs(np.asarray(a, np.float64) - b)))
        if not err <= tol:
            raise SystemExit(f"cusyncbn and torch differ on {name} for {x.shape} {x.dtype}: max |diff| {err:.3g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed rounds per case (median)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--shapes", nargs="+", default=None, metavar="N,C,H,W",
                        help="per-rank input shapes, e.g. 8,64,32,32 (default: %s)" %
                        " ".join(",".join(map(str, s)) for s in SHAPES))
    args = parser.parse_args(argv)
    import torch

    rank, size, comm = world()
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    default_threads = torch.get_num_threads()
    threads = [1] if size > 1 else sorted({default_threads, 1}, reverse=True)
    rng = np.random.default_rng(rank)
    rows = []
    for shape in shapes:
        for dtype in args.dtypes:
            x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            if size == 1:
                torch.set_num_threads(default_threads)
                check_same(x, dy, torch)
            _, forward, backward, step = cusyncbn_case(x, dy)
            jobs = {("ours", "fwd"): (forward, None, backward), ("ours", "bwd"): (backward, forward, None),
                    ("ours", "step"): (step, None, None)}
            for n in threads:
                torch.set_num_threads(n)
                _, t_forward, t_backward, t_step = torch_case(torch, x, dy)
                t_step()                                              # warm-up
                jobs[(n, "fwd")] = (t_forward, with_threads(torch, n), t_backward)
                jobs[(n, "bwd")] = (t_backward, with_threads(torch, n, t_forward), None)
                jobs[(n, "step")] = (t_step, with_threads(torch, n), None)
            median = timed(jobs, args.reps, comm)
            ours = [median[("ours", part)] for part in ("fwd", "bwd", "step")]
            theirs = {n: [median[(n, part)] for part in ("fwd", "bwd", "step")] for n in threads}
            rows.append((shape, dtype, ours, theirs))
    torch.set_num_threads(default_threads)
    if rank == 0:
        print(report(rows, threads, size, torch))
    return 0


def cpu_model():
    """The CPU's model name as ``lscpu`` shows it."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def ms(seconds):
    return f"{seconds * 1e3:.2f}"


def report(rows, threads, size, torch):
    """The markdown table of ``rows`` with a header naming the machine and the versions."""
    head = (f"{cpu_model()}, {os.cpu_count()} CPUs; cusyncbn (NumPy {np.__version__}) vs torch "
            f"{torch.__version__} F.batch_norm, {size} process(es), Python {platform.python_version()}.\n"
            "Median ms per call; 'torch nT': torch with n threads; ratio = cusyncbn fwd+bwd / torch fwd+bwd.")
    cols = ["shape (per rank)", "dtype", "cusyncbn fwd", "cusyncbn bwd", "cusyncbn fwd+bwd"]
    for n in threads:
        cols += [f"torch {n}T fwd", f"torch {n}T bwd", f"torch {n}T fwd+bwd", f"ratio vs {n}T"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for shape, dtype, ours, theirs in rows:
        cells = [str(shape), dtype] + [ms(v) for v in ours]
        for n in threads:
            cells += [ms(v) for v in theirs[n]] + [f"{ours[2] / theirs[n][2]:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
