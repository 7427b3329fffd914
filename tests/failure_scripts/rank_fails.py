"""One rank fails while the others wait in a collective; tests/test_failures.py checks the job ends.

Launch:
    mpiexec -n 2 python tests/failure_scripts/rank_fails.py CASE
    mpiexec -n 2 python -m mpi4py tests/failure_scripts/rank_fails.py CASE

Every rank trains a SyncBatchNorm on the CPU for a step; then rank 1 fails as CASE says
and rank 0 goes on to the next forward, whose all-reduce waits for rank 1. CASEs:
exception, exit (sys.exit(3)), bad_input (wrong channel count, no debug), channels
(layers of 4 and 5 channels, no debug), thread (an exception in a thread), nccl (an
exception with a fake NCCL communicator, which must be aborted first). ``normal``
catches two sys.exit(1) and ends with exit status 0; ``hooks`` prints whether the hooks
are installed.
"""
import os
import sys
import threading

import numpy as np

import cusyncbn

CASE = sys.argv[1]


def step(bn, channels):
    x = np.random.default_rng(0).normal(size=(3, channels, 2)).astype(np.float32)
    bn.backward(np.ones_like(bn(x)))


def caught_exits():
    """sys.exit caught by the program: the job must go on."""
    try:
        sys.exit(1)
    except SystemExit:
        pass
    try:
        sys.exit(1)
    except SystemExit as exc:
        kept = exc                                  # a reference cycle: freed only at shutdown
    return kept is not None


def main():
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.rank
    if CASE == "nccl":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import fake_cupy
        os.environ["NCCL_HOSTID"] = f"rank{rank}"
        with fake_cupy.installed(rank) as nccl:
            nccl.NcclCommunicator.abort = lambda self: print(f"rank {rank}: ncclCommAbort", file=sys.stderr)
            comm = cusyncbn.NCCLComm(MPI.COMM_WORLD)
        if rank == 1:
            raise RuntimeError(f"rank 1 fails on purpose with {comm}")
    channels = 5 if CASE == "channels" and rank == 1 else 4
    bn = cusyncbn.SyncBatchNorm(channels, data_format="NCL")
    step(bn, channels)
    if CASE == "hooks":
        print(f"rank {rank}: hooks installed: {sys.excepthook is not sys.__excepthook__}", flush=True)
        return 0
    if rank == 1:
        if CASE == "exception":
            raise RuntimeError("rank 1 fails on purpose")
        if CASE == "exit":
            sys.exit(3)
        if CASE == "bad_input":
            step(bn, channels + 1)
        if CASE == "thread":
            def fail():
                raise RuntimeError("a thread of rank 1 fails on purpose")
            worker = threading.Thread(target=fail, name="loader")
            worker.start()
            worker.join()
        if CASE == "normal":
            caught_exits()
    step(bn, channels)
    print(f"rank {rank}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
