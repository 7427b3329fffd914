"""Train a small PyTorch CNN whose BatchNorm2d layers are swapped for cusyncbn's SyncBatchNorm.

Launch:
    mpiexec -n 2 python examples/torch_convert.py [--steps 30]

No torch.distributed set-up: statistics sync through MPI (CPU) or NCCL (GPU) by
cusyncbn; the conv gradients are summed with cusyncbn.allreduce_gradients. Runs on
the GPU when torch and cusyncbn both see one, else on the CPU.
"""
from __future__ import annotations

import argparse
import sys

import torch

import cusyncbn
import cusyncbn.torch as cbt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    device = cusyncbn.get_device()
    tdevice = torch.device("cuda", int(device.split(":")[1])) if device != "cpu" and torch.cuda.is_available() \
        else torch.device("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 2)).to(tdevice)
    model = cbt.convert_sync_batchnorm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    per_rank = [args.batch // world.size] * world.size
    per_rank[-1] += args.batch - sum(per_rank)
    lo, hi = sum(per_rank[:world.rank]), sum(per_rank[:world.rank + 1])
    gen = torch.Generator().manual_seed(1)               # the same global batches on every rank
    if world.rank == 0:
        print(f"{world.size} rank(s), torch on {tdevice}, cusyncbn on {device}", flush=True)
    first = last = None
    for step in range(1, args.steps + 1):
        labels = torch.randint(0, 2, (args.batch,), generator=gen)
        x = torch.randn(args.batch, 3, 8, 8, generator=gen) + labels.view(-1, 1, 1, 1) * 0.8
        x, labels = x[lo:hi].to(tdevice), labels[lo:hi].to(tdevice)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), labels, reduction="sum") / args.batch
        loss.backward()
        grads = [p.grad.detach() for p in model.parameters()]
        cusyncbn.allreduce_gradients([g.numpy() if g.device.type == "cpu" else _cupy(g) for g in grads])
        opt.step()
        total = world.allreduce(float(loss))
        first = total if first is None else first
        last = total
        if world.rank == 0 and step % max(1, args.steps // 5) == 0:
            print(f"step {step:3d}  loss {total:.4f}", flush=True)
    ok = last < first
    if world.rank == 0:
        print(f"loss {first:.4f} -> {last:.4f}: {'OK' if ok else 'NOT DECREASING'}", flush=True)
    return 0 if ok else 1


def _cupy(t):
    import cupy
    return cupy.from_dlpack(t)


if __name__ == "__main__":
    sys.exit(main())
