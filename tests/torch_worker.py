"""Multi-rank cases of cusyncbn.torch, run by tests/test_torch_dropin.py as

    mpiexec -n N python -m mpi4py tests/torch_worker.py CASE
    mpiexec -n 1 python -m mpi4py tests/torch_worker.py --list

Every rank builds the same global batch from a seed and keeps its own (uneven) slice;
the references are torch's own modules on the whole batch in one process (for behaviour)
and the float64 reference of tests/reference.py (for 16-bit numbers). Failures are
collected, never asserted, until every collective is done; then rank 0 prints one line
``RESULT {json}`` with every rank's errors.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402

import cusyncbn  # noqa: E402
import cusyncbn.torch as cbt  # noqa: E402

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.rank, WORLD.size
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def counted(comm):
    """``comm`` counting its all-reduces in ``comm.calls``. (Not a wrapper object: the
    collectives are numbered per communicator object, and the watchdog's early-exit notices
    carry the MPIComm's own numbers.)"""
    comm.calls = 0
    allreduce = comm.allreduce

    def counting(buf):
        comm.calls += 1
        allreduce(buf)
    comm.allreduce = counting
    return comm


class Forbidden:
    """A communicator of the world's size whose all-reduce must never be called."""

    rank, size = RANK, SIZE

    def allreduce(self, buf):
        raise AssertionError("a collective was made")


def close(errors, what, got, want, rtol=1e-9, atol=1e-9):
    got = np.asarray(got.detach().double().cpu() if isinstance(got, torch.Tensor) else got, np.float64)
    want = np.asarray(want.detach().double().cpu() if isinstance(want, torch.Tensor) else want, np.float64)
    if got.shape != want.shape:
        errors.append(f"rank {RANK}: {what}: shape mismatch {got.shape} vs {want.shape}")
    elif not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        errors.append(f"rank {RANK}: {what}: mismatch, max difference {np.nanmax(np.abs(got - want)):.3g}")


def slice_of(counts):
    return sum(counts[:RANK]), sum(counts[:RANK + 1])



def close_parameters_and_state(errors, tag, ours, theirs):
    """Our module's parameter gradients and state dict against torch's (``theirs``)."""
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters()):
        close(errors, f"{tag} {name}.grad", b.grad, a.grad)
    for name, a in theirs.state_dict().items():
        close(errors, f"{tag} {name}", ours.state_dict()[name], a)

@case
def eval_untracked_uses_own_batch():
    """track_running_stats=False in eval: this rank's own batch, no collective (rank r holds
    [10r, 10r + 2]: y = [-1, 1] everywhere); a rank may evaluate alone; training syncs."""
    errors = []
    x = torch.tensor([[10.0 * RANK], [10.0 * RANK + 2]], dtype=torch.float64)
    counting = counted(cusyncbn.MPIComm(WORLD))
    bn = cbt.SyncBatchNorm(1, track_running_stats=False, comm=counting).double().eval()
    close(errors, "eval y", bn(x), [[-1.0], [1.0]], atol=1e-5)
    if counting.calls:
        errors.append(f"rank {RANK}: eval made {counting.calls} collective(s)")
    if RANK == 0:                                  # validation on rank 0 only: must not wait for the others
        alone = cbt.SyncBatchNorm(1, track_running_stats=False, comm=Forbidden()).double().eval()
        try:
            close(errors, "eval alone y", alone(x), [[-1.0], [1.0]], atol=1e-5)
        except AssertionError as exc:
            errors.append(f"rank 0 evaluating alone: {exc}")
    bn.train()
    whole = np.concatenate([[10.0 * r, 10.0 * r + 2] for r in range(SIZE)])
    want = (whole - whole.mean()) / np.sqrt(whole.var() + 1e-5)
    close(errors, "training y", bn(x), want[2 * RANK:2 * RANK + 2, None])
    if counting.calls < 1:
        errors.append(f"rank {RANK}: training made no collective")
    return errors


@case
def global_batch_of_one_value():
    """One value per channel in the global batch (rank 0 one row, the others none): as
    torch's sync path (which checks the batch size only when its world has fewer than two
    processes) no error; y is the bias and the running variance takes the biased 0 (torch's
    turns non-finite). Two values per channel (ranks 0 and 1) normalize to -1 / +1."""
    errors = []
    comm = cusyncbn.MPIComm(WORLD)
    for kwargs in (dict(), dict(momentum=None), dict(track_running_stats=False)):
        bn = cbt.SyncBatchNorm(2, comm=comm, **kwargs).double()
        with torch.no_grad():
            bn.bias.copy_(torch.tensor([0.5, -0.5]))
        x = torch.tensor([[1.0, 2.0]] if RANK == 0 else [], dtype=torch.float64).reshape(-1, 2)
        y = bn(x)
        close(errors, f"{kwargs} one value y", y, [[0.5, -0.5]] if RANK == 0 else np.zeros((0, 2)))
        factor = 1.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats:
            close(errors, f"{kwargs} one value running_mean", bn.running_mean, [factor * 1.0, factor * 2.0])
            close(errors, f"{kwargs} one value running_var", bn.running_var, [1 - factor] * 2)
            close(errors, f"{kwargs} num_batches_tracked", bn.num_batches_tracked, 1)
        two = torch.tensor([[1.0, 2.0 + RANK]] if RANK < 2 else [], dtype=torch.float64).reshape(-1, 2)
        y = bn(two)
        if RANK < 2:
            close(errors, f"{kwargs} two values y", y, [[0.5, -1.5 if RANK == 0 else 0.5]], atol=1e-4)
    return errors


# The modes, as in test_torch_dropin: what each step does first (on both modules).
SEQUENCE = [lambda m: m.train(), lambda m: None, lambda m: m.eval(), lambda m: m.train(),
            lambda m: setattr(m, "momentum", None), lambda m: setattr(m, "eps", 1e-2),
            lambda m: setattr(m, "track_running_stats", False), lambda m: m.eval(),
            lambda m: setattr(m, "track_running_stats", True), lambda m: m.train()]
CONFIGS = [dict(), dict(affine=False), dict(track_running_stats=False), dict(momentum=None, eps=1e-3)]


def compare_modes(sync):
    errors = []
    comm = cusyncbn.MPIComm(WORLD)
    counts = ([2, 5] + [3, 0, 4])[:SIZE] if SIZE > 1 else [5]
    lo, hi = slice_of(counts)
    gen = torch.Generator().manual_seed(0)
    for config in CONFIGS:
        theirs = torch.nn.SyncBatchNorm(4, **config).double()        # one process: torch's decisions
        ours = cbt.SyncBatchNorm(4, comm=comm, sync=sync, **config).double()
        with torch.no_grad():
            for module in (theirs, ours):
                if module.weight is not None:
                    module.weight.copy_(torch.linspace(0.5, 2, 4))
                    module.bias.copy_(torch.linspace(-1, 1, 4))
        for i, before in enumerate(SEQUENCE):
            before(theirs), before(ours)
            x = torch.randn(sum(counts), 4, 3, 2, generator=gen, dtype=torch.float64) * 2 + 3
            dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            whole, mine = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
            theirs.zero_grad(), ours.zero_grad()
            # torch.nn.SyncBatchNorm syncs training forwards only: in eval without running
            # statistics each rank normalizes its own batch, as BatchNorm2d on that batch.
            own = not theirs.training and theirs.running_mean is None
            tag = f"{config} step {i}"
            try:
                y_ref = theirs(whole[lo:hi] if own else whole)
            except Exception as exc:               # torch's error cases: the same error on every rank
                try:
                    ours(mine)
                    errors.append(f"rank {RANK}: {tag}: no error where torch raises {exc!r}")
                except Exception as mine_exc:
                    if (type(mine_exc), str(mine_exc)) != (type(exc), str(exc)):
                        errors.append(f"rank {RANK}: {tag}: error mismatch {mine_exc!r} vs {exc!r}")
                continue
            (y_ref * (dy[lo:hi] if own else dy)).sum().backward()
            y = ours(mine)
            (y * dy[lo:hi]).sum().backward()
            cbt.allreduce_gradients(ours.parameters(), comm=comm)
            if own:                                # torch's gradients are this rank's own then
                cbt.allreduce_gradients(theirs.parameters(), comm=comm)
            close(errors, f"{tag} y", y, y_ref if own else y_ref[lo:hi])
            close(errors, f"{tag} dx", mine.grad, whole.grad[lo:hi])
            close_parameters_and_state(errors, tag, ours, theirs)
    return errors


@case
def modes_match_torch_on_whole_batch():
    """Every mode (train/eval, momentum=None, track_running_stats flipped, eps changed,
    affine, untracked) on uneven per-rank batches equals torch's module on the whole batch."""
    return compare_modes(sync=True)


@case
def broken_sync_is_caught():
    """Negative control of the comparison above: each rank normalizing alone."""
    return compare_modes(sync=False)


@case
def fused_epilogue_matches_torch_on_whole_batch():
    """fuse_relu and z (Apex's fused epilogue) on uneven per-rank batches, an empty rank among
    four, through the modes of SEQUENCE, channel-second and channels_last: y, dx, dz, the
    parameter gradients (summed over ranks) and the buffers equal torch's module on the whole
    batch followed by ``+ z`` and ``torch.relu``."""
    errors = []
    comm = cusyncbn.MPIComm(WORLD)
    counts = ([2, 5] + [3, 0, 4])[:SIZE] if SIZE > 1 else [5]
    lo, hi = slice_of(counts)
    gen = torch.Generator().manual_seed(2)
    for fuse, with_z, channels_last in ((True, True, False), (True, False, True), (False, True, True),
                                        (True, True, True)):
        theirs = torch.nn.SyncBatchNorm(4, momentum=0.3).double()            # one process: the whole batch
        ours = cbt.SyncBatchNorm(4, momentum=0.3, comm=comm, fuse_relu=fuse).double()
        with torch.no_grad():
            for module in (theirs, ours):
                module.weight.copy_(torch.linspace(0.5, 2, 4))
                module.bias.copy_(torch.linspace(-1, 1, 4))
        for i, before in enumerate(SEQUENCE[:5]):
            before(theirs), before(ours)
            x = torch.randn(sum(counts), 4, 3, 2, generator=gen, dtype=torch.float64) * 2 + 3
            z = torch.randn(x.shape, generator=gen, dtype=torch.float64) if with_z else None
            dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            whole, mine = x.clone().requires_grad_(), x[lo:hi].clone().requires_grad_()
            z_whole = None if z is None else z.clone().requires_grad_()
            z_mine = None if z is None else z[lo:hi].clone().requires_grad_()
            theirs.zero_grad(), ours.zero_grad()
            y_ref = theirs(whole)
            if z is not None:
                y_ref = y_ref + z_whole
            if fuse:
                y_ref = torch.relu(y_ref)
            (y_ref * dy).sum().backward()
            y = ours(mine, z_mine)
            (y * dy[lo:hi]).sum().backward()
            cbt.allreduce_gradients(ours.parameters(), comm=comm)
            tag = f"fuse_relu={fuse} z={with_z} channels_last={channels_last} step {i}"
            close(errors, f"{tag} y", y, y_ref[lo:hi])
            close(errors, f"{tag} dx", mine.grad, whole.grad[lo:hi])
            if z is not None:
                close(errors, f"{tag} dz", z_mine.grad, z_whole.grad[lo:hi])
            close_parameters_and_state(errors, tag, ours, theirs)
    return errors


@case
def low_precision_matches_reference():
    """bfloat16 / float16 input (float32 and 16-bit parameters) on uneven batches against
    the float64 reference on the global batch of the 16-bit values."""
    errors = []
    comm = cusyncbn.MPIComm(WORLD)
    counts = [3 + 2 * r for r in range(SIZE)]
    lo, hi = slice_of(counts)
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        tol = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        for params in ("float32", "input"):
            x = (torch.randn(sum(counts), 3, 4, generator=gen) * 3 + 5).to(dtype)
            dy = torch.randn(x.shape, generator=gen).to(dtype)
            bn = cbt.SyncBatchNorm(3, comm=comm)
            if params == "input":
                bn = bn.to(dtype)
            mine = x[lo:hi].clone().requires_grad_()
            y = bn(mine)
            y.backward(dy[lo:hi])
            xd, dyd = x.double().numpy(), dy.double().numpy()
            w = bn.weight.detach().double().numpy()
            want_y, mean, var = ref.forward(xd, w, 0.0, 1e-5, "NCL")
            want_dx = ref.backward(xd, dyd, w, 1e-5, "NCL")[0]
            tag = f"{dtype} params {params}"
            if y.dtype != dtype or mine.grad.dtype != dtype:
                errors.append(f"rank {RANK} {tag}: dtypes {y.dtype}, {mine.grad.dtype}")
            close(errors, f"{tag} y", y, want_y[lo:hi], rtol=tol, atol=tol)
            close(errors, f"{tag} dx", mine.grad, want_dx[lo:hi], rtol=tol, atol=tol * np.abs(want_dx).max())
            ptol = 2 * tol if params == "input" else 1e-5
            close(errors, f"{tag} running_mean", bn.running_mean, 0.1 * mean, rtol=ptol, atol=ptol)
    return errors


@case
def allreduce_torch_gradients():
    """cusyncbn.allreduce_gradients / cusyncbn.torch.allreduce_gradients on a torch model:
    the gradients summed (or averaged) over the ranks in place, the weights untouched,
    parameters without a gradient skipped."""
    errors = []
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), cbt.SyncBatchNorm(4), torch.nn.Linear(4, 2).bfloat16())
    weights = [p.detach().clone() for p in model.parameters()]
    for i, p in enumerate(model.parameters()):
        p.grad = None if i == 1 else torch.full_like(p, RANK + 1.0)
    grads = [p.grad for p in model.parameters()]
    cusyncbn.allreduce_gradients(model.parameters())           # the default communicator: every MPI rank
    total = SIZE * (SIZE + 1) / 2
    for i, (p, w, g) in enumerate(zip(model.parameters(), weights, grads)):
        if not torch.equal(p.detach(), w):
            errors.append(f"rank {RANK}: parameter {i} changed")
        if i == 1:
            if p.grad is not None:
                errors.append(f"rank {RANK}: a parameter without a gradient got one")
            continue
        if p.grad is not g:
            errors.append(f"rank {RANK}: gradient {i} not reduced in place")
        close(errors, f"summed gradient {i}", p.grad, torch.full(p.shape, total))
    cbt.allreduce_gradients(model.parameters(), op="mean")
    for i, p in enumerate(model.parameters()):
        if p.grad is not None:
            close(errors, f"averaged gradient {i}", p.grad, torch.full(p.shape, total))
    return errors


def main():
    name = sys.argv[1]
    if name == "--list":
        print("RESULT " + json.dumps({"cases": sorted(CASES)}), flush=True)
        return
    torch.manual_seed(0)
    errors = CASES[name]()
    gathered = WORLD.gather(errors, root=0)
    if RANK == 0:
        print("RESULT " + json.dumps({"size": SIZE, "errors": [e for es in gathered for e in es]}), flush=True)


if __name__ == "__main__":
    main()
