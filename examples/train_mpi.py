"""Data-parallel training of a small MLP with SyncBatchNorm, on synthetic data.

Launch:
    mpiexec -n 2 python examples/train_mpi.py [--steps 60] [--device cpu|gpu]
    mpiexec -n 2 python -m mpi4py examples/train_mpi.py ...     (the same)

If one rank fails (an exception, sys.exit(1)), every rank ends with MPI_Abort instead of
waiting for it forever: cusyncbn's hooks do that, and so does ``python -m mpi4py``
(README, "When something goes wrong").

Each rank holds an uneven slice of every global batch (rank r gets more samples than
rank r-1), runs Linear -> SyncBatchNorm -> ReLU -> Linear -> softmax cross-entropy,
sums the parameter gradients over ranks with one all-reduce and takes an SGD step.
Rank 0 also trains the same network in a single process on the whole batch and
checks, at the end, that both runs reached the same parameters: synchronized batch
norm makes data parallelism exact, even for uneven batches.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import cusyncbn


def init_params(rng, d_in, hidden, classes):
    return {"w1": rng.normal(0, 1 / np.sqrt(d_in), (d_in, hidden)), "w2": rng.normal(0, 1 / np.sqrt(hidden), (hidden, classes))}


class MLP:
    """x @ w1 -> SyncBatchNorm -> ReLU -> @ w2, with a hand-written backward."""

    def __init__(self, params, xp, comm, hidden):
        self.xp = xp
        self.w1 = cusyncbn.Parameter(xp.asarray(params["w1"], dtype=xp.float32), "w1")
        self.w2 = cusyncbn.Parameter(xp.asarray(params["w2"], dtype=xp.float32), "w2")
        self.bn = cusyncbn.SyncBatchNorm(hidden, data_format="NC", comm=comm)

    def parameters(self):
        return [self.w1, self.w2] + self.bn.parameters()

    def loss_and_grads(self, x, labels, global_count):
        """This rank's share of the global mean cross-entropy, and its partial gradients."""
        xp = self.xp
        h = x @ self.w1.data
        z = self.bn(h)
        a = xp.maximum(z, 0)
        logits = a @ self.w2.data
        logits = logits - logits.max(axis=1, keepdims=True)
        p = xp.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        rows = xp.arange(len(labels))
        loss = -xp.log(p[rows, labels] + 1e-12).sum() / global_count
        dlogits = p.copy()
        dlogits[rows, labels] -= 1
        dlogits /= global_count
        self.w2.grad = a.T @ dlogits
        dz = (dlogits @ self.w2.data.T) * (z > 0)
        dh = self.bn.backward(dz.astype(xp.float32))
        self.w1.grad = x.T @ dh
        return loss

    def sgd(self, lr):
        for p in self.parameters():
            p.data -= lr * p.grad
        self.bn.clear_gradients()


def progress_bar(steps):
    """A tqdm bar on stderr when stderr is a terminal and tqdm is installed, else None.

    Under mpiexec the ranks' output reaches the terminal through pipes, and a bar redrawn
    with carriage returns would interleave with the other lines: then (and without tqdm)
    the periodic loss lines are all the progress there is.
    """
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, unit="step", file=sys.stderr, leave=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=96, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--device", default=None, help="cpu, gpu or gpu:N (default: gpu when usable)")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    device = cusyncbn.set_device(args.device) if args.device else cusyncbn.get_device()
    if device == "cpu":
        xp = np
    else:
        import cupy as xp
        xp.cuda.Device(int(device.split(":")[1])).use()
    d_in, hidden, classes = 20, 32, 4
    rng = np.random.default_rng(0)                           # same data and init on every rank
    params = init_params(rng, d_in, hidden, classes)
    centers = rng.normal(0, 2, (classes, d_in))
    weights = np.arange(1, size + 1)                          # uneven split: rank r gets a share of r + 1
    counts = (args.batch * weights // weights.sum()).tolist()
    counts[-1] += args.batch - sum(counts)
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])

    model = MLP(params, xp, None, hidden)
    single = MLP(params, xp, cusyncbn.SingleProcessComm(), hidden) if rank == 0 else None
    if rank == 0:
        print(f"cusyncbn {cusyncbn.__version__}: {size} rank(s) on {device}, per-rank batch {counts}", flush=True)
    first = last = None
    bar = progress_bar(args.steps) if rank == 0 else None
    for step in range(1, args.steps + 1):
        labels = rng.integers(0, classes, args.batch)
        x = (centers[labels] + rng.normal(0, 1.5, (args.batch, d_in))).astype(np.float32)
        loss = model.loss_and_grads(xp.asarray(x[lo:hi]), xp.asarray(labels[lo:hi]), args.batch)
        cusyncbn.allreduce_gradients(model.parameters())       # one all-reduce: full gradients everywhere
        model.sgd(args.lr)
        total = world.allreduce(float(loss))
        if single is not None:
            single.loss_and_grads(xp.asarray(x), xp.asarray(labels), args.batch)
            single.sgd(args.lr)
            first = total if first is None else first
            last = total
            if bar is not None:
                bar.set_postfix_str(f"loss {total:.4f}", refresh=False)
                bar.update()
            if step % max(1, args.steps // 5) == 0:
                line = f"step {step:4d}  loss {total:.4f}"
                if bar is not None:
                    bar.write(line)
                else:
                    print(line, flush=True)
    if bar is not None:
        bar.close()
    ok = True
    if single is not None:
        diffs = [float(abs(a.data - b.data).max()) for a, b in zip(model.parameters(), single.parameters())]
        diffs.append(float(abs(model.bn.running_mean - single.bn.running_mean).max()))
        ok = max(diffs) < 1e-3 and last < first
        print(f"loss {first:.4f} -> {last:.4f}; max difference from one process on the whole batch: "
              f"{max(diffs):.2e} -> {'OK' if ok else 'MISMATCH'}", flush=True)
    ok = world.bcast(ok, root=0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
