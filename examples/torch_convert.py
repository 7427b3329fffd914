"""Train a small PyTorch CNN whose BatchNorm2d layers are swapped for cusyncbn's SyncBatchNorm.

Launch, from the repository root after the README's install commands (a .venv with
cusyncbn, mpich and torch: `.venv/bin/pip install -e ".[mpi,torch]"`):

    .venv/bin/mpiexec -n 2 .venv/bin/python examples/torch_convert.py [--steps 30]

No torch.distributed set-up: statistics sync through MPI (CPU) or NCCL (GPU) by
cusyncbn, and the gradients are summed with cusyncbn.torch.allreduce_gradients. Runs on
the GPU when torch and cusyncbn both see one, else on the CPU.

Each rank holds an uneven slice of every global batch (rank r gets a share of r + 1).
Rank 0 also trains the same network, with torch's own BatchNorm2d, in a single process
on the whole batch, and checks at the end that both runs reached the same parameters and
running statistics: synchronized batch norm makes data parallelism exact, even for uneven
batches. Both train in float64, so that the check is tight (float32 training works the
same, to float32's rounding). With --no-sync each rank keeps torch's BatchNorm2d on its
own slice instead, and the check shows what synchronization fixes.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

import cusyncbn
import cusyncbn.torch as cbt


def make_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 2)).to(device, torch.float64)


def step(model, opt, x, labels, global_batch, data_parallel):
    """One SGD step on this process's share of the loss (a mean over the global batch)."""
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), labels, reduction="sum") / global_batch
    loss.backward()
    if data_parallel:
        cbt.allreduce_gradients(model.parameters())     # per-rank shares -> full gradients, one all-reduce
    opt.step()
    return loss.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--no-sync", action="store_true",
                        help="keep torch's per-rank BatchNorm2d (the mismatch that synchronization removes)")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.rank, world.size
    device = cusyncbn.get_device()
    tdevice = torch.device("cuda", int(device.split(":")[1])) if device != "cpu" and torch.cuda.is_available() \
        else torch.device("cpu")
    model = make_model(tdevice)
    single = copy.deepcopy(model) if rank == 0 else None                 # torch's BatchNorm2d, whole batch
    if not args.no_sync:
        model = cbt.convert_sync_batchnorm(model)                       # syncs over all MPI ranks
    opts = [torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9) for m in (model, single) if m is not None]
    shares = list(range(1, size + 1))                                    # uneven: rank r gets a share of r + 1
    counts = [args.batch * s // sum(shares) for s in shares]
    counts[-1] += args.batch - sum(counts)
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    gen = torch.Generator().manual_seed(1)                               # the same global batches on every rank
    if rank == 0:
        print(f"{size} rank(s), torch on {tdevice}, cusyncbn on {device}, per-rank batch {counts}"
              f"{' (no sync)' if args.no_sync else ''}", flush=True)
    first = last = None
    for i in range(1, args.steps + 1):
        labels = torch.randint(0, 2, (args.batch,), generator=gen)
        x = torch.randn(args.batch, 3, 8, 8, generator=gen, dtype=torch.float64) + labels.view(-1, 1, 1, 1) * 0.8
        x, labels = x.to(tdevice), labels.to(tdevice)
        loss = step(model, opts[0], x[lo:hi], labels[lo:hi], args.batch, data_parallel=True)
        total = world.allreduce(loss)
        if single is not None:
            step(single, opts[1], x, labels, args.batch, data_parallel=False)
            first = total if first is None else first
            last = total
            if i % max(1, args.steps // 5) == 0:
                print(f"step {i:3d}  loss {total:.4f}", flush=True)
    ok = True
    if single is not None:
        ours, theirs = model.state_dict(), single.state_dict()
        diff = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in theirs)
        ok = diff < 1e-6 and last < first
        print(f"loss {first:.4f} -> {last:.4f}; max difference from one process on the whole batch "
              f"{diff:.2e}: {'OK' if ok else 'MISMATCH'}", flush=True)
    ok = world.bcast(ok, root=0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
