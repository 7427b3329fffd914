"""The last rank fails while the others wait in a collective; tests/test_failures.py checks the job ends.

Launch:
    mpiexec -n 2 python tests/failure_scripts/rank_fails.py CASE
    mpiexec -n 2 python -m mpi4py tests/failure_scripts/rank_fails.py CASE

Every rank trains a SyncBatchNorm on the CPU for a step; then the last rank fails as
CASE says, and the others go on to the next forward, whose all-reduce waits for it:
  exception     raises RuntimeError
  exit          sys.exit(3)
  exit_message  sys.exit("...")
  bad_input     passes 5 channels to a layer of 4 (no debug mode)
  channels      builds its layer with 5 channels, the others with 4 (no debug mode)
  thread        an exception in a thread named "loader"
  nccl          raises with an NCCLComm (tests/fake_cupy.py), which must be aborted first
  nccl_lengths  passes 13 values to NCCLComm.allreduce, the others 11
  opted_out     calls set_abort_on_failure(False) and raises, the others do not wait
  normal        catches two sys.exit(1) and ends with status 0
  before_first  builds its layer, then raises before any collective (the script imports no
                mpi4py itself: building the layer must be enough)
Every rank that gets to the end prints "rank R: done (hooks installed: ...)".
"""
import os
import sys
import threading
from types import SimpleNamespace

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
    return kept


def fail_in_thread():
    def fail():
        raise RuntimeError("a thread fails on purpose")
    worker = threading.Thread(target=fail, name="loader")
    worker.start()
    worker.join()


def nccl_comm(world):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fake_cupy
    os.environ["NCCL_HOSTID"] = f"rank{world.rank}"
    with fake_cupy.installed(world.rank) as nccl:
        nccl.NcclCommunicator.abort = lambda self: print(f"rank {self.rank}: ncclCommAbort", file=sys.stderr)
        nccl.NcclCommunicator.allReduce = lambda self, *args: None
        return cusyncbn.NCCLComm(world)


def fake_cupy_buffer(size):
    return SimpleNamespace(dtype=np.dtype(np.float64), size=size, data=SimpleNamespace(ptr=0))


def fail_before_first_collective():
    bn = cusyncbn.SyncBatchNorm(4, data_format="NCL")
    if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "1":
        raise RuntimeError("fails on purpose before its first collective")
    step(bn, 4)
    return 0


def main():
    if CASE == "before_first":
        return fail_before_first_collective()
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, failing = world.rank, world.rank == world.size - 1
    if CASE == "nccl":
        comm = nccl_comm(world)
        if failing:
            raise RuntimeError(f"fails on purpose with {comm}")
    if CASE == "nccl_lengths":
        comm = nccl_comm(world)
        comm.allreduce(fake_cupy_buffer(13 if failing else 11))
    channels = 5 if CASE == "channels" and failing else 4
    bn = cusyncbn.SyncBatchNorm(channels, data_format="NCL")
    step(bn, channels)
    if failing:
        if CASE == "exception":
            raise RuntimeError("fails on purpose")
        if CASE == "exit":
            sys.exit(3)
        if CASE == "exit_message":
            sys.exit("gives up on purpose")
        if CASE == "bad_input":
            step(bn, channels + 1)
        if CASE == "thread":
            fail_in_thread()
        if CASE == "opted_out":
            cusyncbn.set_abort_on_failure(False)
            raise RuntimeError("fails on purpose, opted out")
        if CASE == "normal":
            caught_exits()
    if CASE != "opted_out":
        step(bn, channels)
    print(f"rank {rank}: done (hooks installed: {sys.excepthook is not sys.__excepthook__})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
