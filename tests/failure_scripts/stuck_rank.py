"""One rank leaves the others waiting in a collective; tests/test_watchdog.py checks the job ends.

Launch:
    CUSYNCBN_TIMEOUT=5 mpiexec -n 2 python tests/failure_scripts/stuck_rank.py CASE[:gpu]

With ":gpu" the layer runs on the GPU over NCCL, the ranks sharing one GPU (each declares
its own NCCL_HOSTID: NCCL refuses two ranks on one device of one host); the host never waits in a
collective, and the watchdog thread is what ends the job.

Every rank trains SyncBatchNorm(4, name="bn3") on the CPU for 6 steps (collectives 1-2 the
first forward, which finds its pivot, 3 its backward, then 2k and 2k+1 for step k), except:
  skip_step  the last rank does 5 steps and its script ends normally
  stuck      the last rank sleeps 60 s in user code before step 3
  slow       the last rank sleeps 2 s before each of steps 1-3 (the job must complete)
Every rank that gets to the end checks its running mean against the global batch's and
prints "rank R: done, running mean right: True".
"""
import sys
import time

import numpy as np

import cusyncbn

CASE, _, WHERE = sys.argv[1].partition(":")
GPU = WHERE == "gpu"
STEPS = 6


def batch(rank):
    return np.random.default_rng(rank).normal(1.0, 2.0, size=(3 + rank, 4, 5)).astype(np.float32)


def main():
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    last = world.rank == world.size - 1
    if GPU:
        import os
        import cupy
        os.environ["NCCL_HOSTID"] = f"rank{world.rank}"          # ranks share one GPU (tests only)
        bn = cusyncbn.SyncBatchNorm(4, name="bn3", data_format="NCL", device="gpu",
                                    comm=cusyncbn.NCCLComm(world))
        x = cupy.asarray(batch(world.rank))
        ones = cupy.ones_like
    else:
        bn = cusyncbn.SyncBatchNorm(4, name="bn3", data_format="NCL", device="cpu")
        x = batch(world.rank)
        ones = np.ones_like
    steps = STEPS - 1 if CASE == "skip_step" and last else STEPS
    for step in range(1, steps + 1):
        if last and CASE == "stuck" and step == 3:
            time.sleep(60)
        if last and CASE == "slow" and step <= 3:
            time.sleep(2)
        bn.backward(ones(bn(x)))
    # The global batch, rebuilt here (no collective: a rank that skipped a step has exited).
    every = np.concatenate([batch(r) for r in range(world.size)]).astype(np.float64)
    expected = (1 - 0.9 ** steps) * every.mean(axis=(0, 2))   # running mean from 0, momentum 0.9
    running = cusyncbn.functional.flush_reports() or (bn.running_mean.get() if GPU else bn.running_mean)
    right = bool(np.allclose(running, expected, rtol=1e-5, atol=1e-6))
    print(f"rank {world.rank}: done, running mean right: {right}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
