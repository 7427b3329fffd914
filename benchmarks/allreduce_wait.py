"""How long a rank that reaches an all-reduce first waits, against a plain blocking MPI_Allreduce.

Launch (from a checkout, after ``pip install -e ".[mpi]"``):
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/allreduce_wait.py [--reps 30] [--channels 256]

Rank 1 spins for a given delay before each all-reduce while rank 0 calls it at once; rank 0
times its call and prints, per delay, the median of (its time - the delay): what it waited
beyond the late rank's arrival. The payload is a forward pass's, 2C + 3 float64 values. It
compares ``cusyncbn.MPIComm.allreduce`` (non-blocking, waited on with a backed-off test loop so
that no core spins; README, "A stuck collective never hangs the job") with mpi4py's blocking
``Allreduce`` on the same communicator.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import cusyncbn

DELAYS_MS = (0.0, 0.1, 0.5, 2.0, 6.0)


def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="all-reduces per delay and implementation (median)")
    parser.add_argument("--channels", type=int, default=256, help="C: the payload is 2C + 3 float64 values")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.size < 2:
        print("run under mpiexec with 2 or more ranks: .venv/bin/mpiexec -n 2 .venv/bin/python "
              "benchmarks/allreduce_wait.py", file=sys.stderr)
        return 2
    comm = cusyncbn.MPIComm(world)
    buf = np.zeros(2 * args.channels + 3)
    cases = (("cusyncbn.MPIComm.allreduce", lambda: comm.allreduce(buf)),
             ("mpi4py Allreduce (blocking)", lambda: world.Allreduce(MPI.IN_PLACE, buf)))
    for delay_ms in DELAYS_MS:
        for name, call in cases:
            extra = []
            for _ in range(args.reps):
                world.Barrier()
                if world.rank == 1:
                    spin(delay_ms / 1e3)
                start = time.perf_counter()
                call()
                extra.append((time.perf_counter() - start) * 1e3 - delay_ms)
            if world.rank == 0:
                print(f"rank 1 late by {delay_ms:.1f} ms: {name}: rank 0 waited {statistics.median(extra):.2f} ms "
                      f"longer (median of {args.reps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
