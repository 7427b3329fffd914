"""Train a small Paddle CNN whose BatchNorm2D layers are swapped for cusyncbn's SyncBatchNorm.

Launch:
    mpiexec -n 2 python examples/paddle_convert.py [--steps 30]

No paddle.distributed set-up: statistics sync through MPI (CPU) or NCCL (GPU) by
cusyncbn, the other gradients are summed with cusyncbn.paddle.allreduce_gradients.
Runs on the GPU when Paddle is built with CUDA and cusyncbn sees a GPU (CuPy), else
on the CPU; the layers follow the tensors' device.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import paddle

import cusyncbn
import cusyncbn.paddle as cbp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    device = cusyncbn.get_device()            # "gpu:N" (this rank's GPU) when CuPy sees one, else "cpu"
    on_gpu = device != "cpu" and paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    paddle.set_device(device if on_gpu else "cpu")
    paddle.seed(0)
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 16, 3, padding=1), paddle.nn.BatchNorm2D(16), paddle.nn.ReLU(),
        paddle.nn.Conv2D(16, 16, 3, padding=1), paddle.nn.BatchNorm2D(16), paddle.nn.ReLU(),
        paddle.nn.AdaptiveAvgPool2D(1), paddle.nn.Flatten(), paddle.nn.Linear(16, 2))
    model = cbp.convert_sync_batchnorm(model)
    opt = paddle.optimizer.Momentum(learning_rate=0.2, momentum=0.9, parameters=model.parameters())
    per_rank = [args.batch // world.size] * world.size
    per_rank[-1] += args.batch - sum(per_rank)
    lo, hi = sum(per_rank[:world.rank]), sum(per_rank[:world.rank + 1])
    rng = np.random.default_rng(1)                    # the same global batches on every rank
    if world.rank == 0:
        print(f"{world.size} rank(s), paddle on {paddle.get_device()}", flush=True)
    first = last = None
    for step in range(1, args.steps + 1):
        labels = rng.integers(0, 2, size=args.batch)
        x = (rng.normal(size=(args.batch, 3, 8, 8)) + 0.8 * labels.reshape(-1, 1, 1, 1)).astype("float32")
        x, y = paddle.to_tensor(x[lo:hi]), paddle.to_tensor(labels[lo:hi])
        loss = paddle.nn.functional.cross_entropy(model(x), y, reduction="sum") / args.batch
        loss.backward()
        cbp.allreduce_gradients(model.parameters())   # sum of the per-rank shares: the global gradient
        opt.step()
        opt.clear_grad()
        total = world.allreduce(float(loss))
        first = total if first is None else first
        last = total
        if world.rank == 0 and step % max(1, args.steps // 5) == 0:
            print(f"step {step:3d}  loss {total:.4f}", flush=True)
    ok = last < first
    if world.rank == 0:
        print(f"loss {first:.4f} -> {last:.4f}: {'OK' if ok else 'NOT DECREASING'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
