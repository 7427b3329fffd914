"""Train a small Paddle CNN whose BatchNorm2D layers are swapped for cusyncbn's SyncBatchNorm,
and check that data parallelism with it is exact: the same training as one process on the
whole batch.

Launch, from the checkout, after the README's install commands (and `.venv/bin/pip install
paddlepaddle`, or the README's test set-up, which installs it):
    .venv/bin/mpiexec -n 2 .venv/bin/python examples/paddle_convert.py [--steps 20] [--dtype float32]
    (with the venv activated: mpiexec -n 2 python examples/paddle_convert.py)

Each rank holds an uneven slice of every global batch (rank r a share of r + 1). No
paddle.distributed set-up: the batch-norm statistics sync through MPI (CPU) or NCCL (GPU)
by cusyncbn, the other gradients are summed with cusyncbn.paddle.allreduce_gradients. Rank 0
also trains the unconverted model (Paddle's own BatchNorm2D) in one process on the whole
batch; every rank then compares its parameters, running statistics and losses with that run
and prints OK when they agree (float64: to 1e-8 relative). --no-convert keeps Paddle's local
BatchNorm2D on each rank: a control, which prints MISMATCH. Runs on the GPU when Paddle is
built with CUDA and cusyncbn sees a GPU (CuPy), else on the CPU; the layers follow the tensors.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import paddle

import cusyncbn
import cusyncbn.paddle as cbp

TOL = {"float64": 1e-8, "float32": 1e-3}


def make_model():
    paddle.seed(0)                                   # the same initial parameters every time
    # Momenta exact in float32: Paddle's kernel rounds momentum to float32 (0.9 -> 0.899999976),
    # cusyncbn takes the float as it is; with 0.9 the running statistics differ by ~1e-7 per step.
    return paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 16, 3, padding=1), paddle.nn.BatchNorm2D(16, momentum=0.75), paddle.nn.ReLU(),
        paddle.nn.Conv2D(16, 16, 3, padding=1), paddle.nn.BatchNorm2D(16, momentum=0.5), paddle.nn.ReLU(),
        paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(16, 2))


def train(model, batches, rows, total, distributed, log):
    """SGD with momentum on a loss that sums over the global batch and divides by its size:
    this process's share of it on ``rows`` of each batch. Returns the global losses."""
    opt = paddle.optimizer.Momentum(learning_rate=0.2, momentum=0.9, parameters=model.parameters())
    losses = []
    for step, (x, labels) in enumerate(batches, 1):
        logits = model(paddle.to_tensor(x[rows]))
        loss = paddle.nn.functional.cross_entropy(logits, paddle.to_tensor(labels[rows]), reduction="sum") / total
        loss.backward()
        if distributed:
            cbp.allreduce_gradients(model.parameters())   # sum of the per-rank shares: the global gradient
        opt.step()
        opt.clear_grad()
        losses.append(log(step, float(loss)))
    return losses


def relative_difference(got, want):
    """The largest |got - want| relative to |want| (to 1e-3 where |want| is smaller)."""
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-3)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=30, help="global batch size")
    parser.add_argument("--dtype", choices=sorted(TOL), default="float64")
    parser.add_argument("--no-convert", action="store_true", help="keep the local BatchNorm2D layers (a control)")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    # Paddle's BatchNorm2D says this at every training forward of the reference model.
    warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance")
    world = MPI.COMM_WORLD
    device = cusyncbn.get_device()            # "gpu:N" (this rank's GPU) when CuPy sees one, else "cpu"
    on_gpu = device != "cpu" and paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    paddle.set_device(device if on_gpu else "cpu")
    paddle.set_default_dtype(args.dtype)
    weights = np.arange(1, world.size + 1)                    # uneven: rank r gets a share of r + 1
    counts = (args.batch * weights // weights.sum()).tolist()
    counts[-1] += args.batch - sum(counts)
    rows = slice(sum(counts[:world.rank]), sum(counts[:world.rank + 1]))
    rng = np.random.default_rng(1)                            # the same global batches on every rank
    batches = []
    for _ in range(args.steps):
        labels = rng.integers(0, 2, size=args.batch)
        x = rng.normal(size=(args.batch, 3, 8, 8)) + 0.8 * labels.reshape(-1, 1, 1, 1)
        batches.append((x.astype(args.dtype), labels))
    if world.rank == 0:
        print(f"{world.size} rank(s), paddle on {paddle.get_device()}, {args.dtype}, per-rank batch {counts}",
              flush=True)

    def log(step, loss):
        total = world.allreduce(loss)
        if world.rank == 0 and step % max(1, args.steps // 5) == 0:
            print(f"step {step:3d}  loss {total:.4f}", flush=True)
        return total

    model = make_model() if args.no_convert else cbp.convert_sync_batchnorm(make_model())
    losses = train(model, batches, rows, args.batch, True, log)
    # The same model, unconverted, in one process on the whole batch (rank 0), shared with all.
    expected = None
    if world.rank == 0:
        reference = make_model()
        ref_losses = train(reference, batches, slice(None), args.batch, False, lambda step, loss: loss)
        expected = (ref_losses, {k: v.numpy() for k, v in reference.state_dict().items()})
    ref_losses, ref_state = world.bcast(expected, root=0)
    mine = {k: v.numpy() for k, v in model.state_dict().items()}
    worst = max(relative_difference(mine[k], v) for k, v in ref_state.items())
    worst = max(worst, relative_difference(np.array(losses), np.array(ref_losses)))
    ok = mine.keys() == ref_state.keys() and worst <= TOL[args.dtype]
    ok = world.allreduce(int(ok), op=MPI.MIN) == 1
    if world.rank == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; parameters, running statistics and losses against one "
              f"process on the whole batch: max relative difference {worst:.1e}: {'OK' if ok else 'MISMATCH'}",
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
