"""Explicit forward/backward of cusyncbn's SyncBatchNorm on JAX arrays, through DLPack.

Launch:
    mpiexec -n 2 python examples/jax_dlpack.py      (or plain: python examples/jax_dlpack.py)

JAX arrays go in, JAX arrays come out (``output="input"``), zero-copy where JAX
allows; the layer's gradient is checked against ``jax.grad`` of a plain-JAX batch
norm on the whole (global) batch.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import cusyncbn


def jax_batchnorm(x, eps=1e-5):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


def main():
    jax.config.update("jax_enable_x64", True)
    rank, size = 0, 1
    if cusyncbn._comm.launched_size() > 1:
        from mpi4py import MPI
        rank, size = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
    rng = np.random.default_rng(0)
    x_all = jnp.asarray(rng.normal(2.0, 3.0, size=(4 * size + 1, 3, 4, 4)))
    w_all = jnp.asarray(rng.normal(size=x_all.shape))
    lo, hi = rank * 4, (rank + 1) * 4 + (1 if rank == size - 1 else 0)     # uneven: last rank has one more

    bn = cusyncbn.SyncBatchNorm(3, device="cpu", dtype="float64", output="input")
    y = bn(x_all[lo:hi])
    dx = bn.backward(w_all[lo:hi])                     # d(sum(y * w)) / dx
    want_y = jax_batchnorm(x_all)[lo:hi]
    want_dx = jax.grad(lambda x: (jax_batchnorm(x) * w_all).sum())(x_all)[lo:hi]
    err = max(float(jnp.abs(y - want_y).max()), float(jnp.abs(dx - want_dx).max()))
    ok = isinstance(y, jax.Array) and isinstance(dx, jax.Array) and err < 1e-9
    print(f"rank {rank}/{size}: y and dx are {type(y).__name__}; max error vs jax.grad on the global batch "
          f"{err:.2e} -> {'OK' if ok else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
