"""Explicit forward/backward of cusyncbn's SyncBatchNorm on JAX arrays, through DLPack.

Launch:
    mpiexec -n 2 python examples/jax_dlpack.py      (or plain: python examples/jax_dlpack.py)

JAX arrays go in, JAX arrays come out (``output="input"``), zero-copy where JAX
allows; the layer's gradient is checked against ``jax.grad`` of a plain-JAX batch
norm on the whole (global) batch. The layer is made where JAX put the data
(``cusyncbn.device_of``): on the CPU with a CPU-only JAX, on this rank's GPU with a
CUDA JAX, whatever CuPy sees.
"""
from __future__ import annotations

import os
import sys

# A CUDA JAX would otherwise take 75% of every visible GPU in every rank, leaving nothing
# for the other ranks and for CuPy.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import cusyncbn  # noqa: E402


def jax_batchnorm(x, eps=1e-5):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


def main():
    jax.config.update("jax_enable_x64", True)
    rank, size, local_rank = 0, 1, 0
    if cusyncbn._comm.launched_size() > 1:
        from mpi4py import MPI
        rank, size = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank = node.rank
        node.Free()
    devices = jax.local_devices()
    mine = devices[local_rank % len(devices)]                 # one GPU per rank on a node, as cusyncbn picks
    rng = np.random.default_rng(0)
    x_all = jnp.asarray(rng.normal(2.0, 3.0, size=(4 * size + 1, 3, 4, 4)))
    w_all = jnp.asarray(rng.normal(size=x_all.shape))
    lo, hi = rank * 4, (rank + 1) * 4 + (1 if rank == size - 1 else 0)     # uneven: last rank has one more

    x, w = jax.device_put(x_all[lo:hi], mine), jax.device_put(w_all[lo:hi], mine)
    bn = cusyncbn.SyncBatchNorm(3, device=cusyncbn.device_of(x), dtype="float64", output="input")
    y = bn(x)
    dx = bn.backward(w)                                # d(sum(y * w)) / dx
    want_y = jax_batchnorm(x_all)[lo:hi]
    want_dx = jax.grad(lambda x: (jax_batchnorm(x) * w_all).sum())(x_all)[lo:hi]
    err = max(float(jnp.abs(y - want_y).max()), float(jnp.abs(dx - want_dx).max()))
    ok = isinstance(y, jax.Array) and isinstance(dx, jax.Array) and err < 1e-9
    print(f"rank {rank}/{size}: layer on {bn.device}, y and dx are {type(y).__name__}; max error vs jax.grad "
          f"on the global batch {err:.2e} -> {'OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
