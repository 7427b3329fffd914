"""Benchmark: cusyncbn vs PyTorch (cuDNN and its synchronized path) vs naive CuPy, on one GPU.

Run:
    python -m cusyncbn.bench [--quick] [--out bench_out] [--profile | --sweep]
    python -m cusyncbn.bench --profile [--quick]     # under ncu: see docs/PERFORMANCE.md
    python -m cusyncbn.bench --sweep [--out DIR]     # tune the launch configurations: DIR/tuning.json
    python -m cusyncbn.bench --dram-table NCU_CSV [--quick]   # DRAM bytes per pass, from ncu's raw CSV

For every shape, dtype and layout it first checks each implementation's results against
the float64 reference (``cusyncbn._reference``, on the GPU), then times forward and
backward with CUDA events (median of many runs, inputs rotated so that the working set
exceeds L2), and reports each time and its fraction of the byte floor at the measured copy
bandwidth, of two floors (:func:`floor_bytes`): today's (forward reads x twice and writes
y: 3 * numel * itemsize bytes; backward reads x and dy twice and writes dx: 5 * numel *
itemsize) and the L2-aware one (the second read served from L2 as far as the GPU's L2
holds it). The fused epilogues run too: cusyncbn's ``activation="relu"`` (and with
``residual=z``) against cuDNN's batch norm followed by ``torch.relu`` (and by ``+ z``,
then ``relu``). It also measures the host time of one cusyncbn layer call and of one
``torch.nn.functional.batch_norm`` call the same way. It prints a table with a summary
against the targets and writes them as markdown (results.md) and, when matplotlib is
installed, a chart (results.png). cusyncbn runs with a 1-rank NCCL communicator, so the
collective is really called.

``--profile`` times nothing: it runs one warmed-up training forward+backward per
configuration and implementation, each pass between ``cudaProfilerStart`` and
``cudaProfilerStop`` after emptying the L2, so that ``ncu --profile-from-start off`` profiles
exactly those kernels. ``--dram-table NCU_CSV`` reads Nsight Compute's raw CSV of such a run
and prints cusyncbn's DRAM bytes per pass against the byte floors (:func:`dram_table`).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import math
import os
import re
import sys
import time
from typing import NamedTuple

from . import _ncu, _reference
from ._bench_cases import (DTYPES, ITEMSIZE, LAYOUTS, QUICK_SHAPES, SHAPES, configurations, cuda_ms, host_us,
                           nccl_comm as _nccl_comm)

# The L2 size when the device's cannot be read: the H200's, the largest L2 of the GPUs this
# runs on (H100: 50 MiB). Too large is the safe side: the L2-aware floor stays a lower bound
# and the inputs' rotation still exceeds L2.
L2_FALLBACK_BYTES = 60 << 20
TOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}
EPS = 1e-5


def l2_bytes() -> int:
    """The current GPU's L2 cache in bytes (``cudaDeviceProp.l2CacheSize``, through CuPy), or
    ``L2_FALLBACK_BYTES`` when it cannot be read (no CuPy, no device)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["l2CacheSize"])
    except (ImportError, RuntimeError):                 # CuPy's CUDARuntimeError is a RuntimeError
        return L2_FALLBACK_BYTES


def floor_bytes(nbytes: int, which: str, l2: int = 0) -> int:
    """The DRAM bytes a training pass must move at least, for an input of ``nbytes`` bytes
    (x; dy and y or dx the same size), with ``l2`` bytes of L2 cache to serve the second read:

        forward:  3 * nbytes - min(nbytes, l2)        (l2 = 0: 3N; input within L2: 2N)
        backward: 5 * nbytes - min(2 * nbytes, l2)    (l2 = 0: 5N; x and dy within L2: 3N)

    The forward reads x twice (statistics, then normalization; the all-reduce between them)
    and writes y; the backward reads x and dy twice (reductions, then dx) and writes dx.
    ``l2 = 0`` is the benchmark's byte floor since its first version ("% floor"). With ``l2``
    the L2 size, a second kernel that starts on the data the first one read last finds in
    L2 whatever of the first read is still there: at most the last ``l2`` bytes of it (of x
    in the forward, of x and dy in the backward). The inputs are taken cold at the start of
    a pass (the benchmark rotates them past L2) and every write as reaching DRAM. Left out,
    so that both stay lower bounds: the O(C) payload (parameters, statistics, the
    all-reduce's 2C + 3 doubles: at most about 1% of the floor on the benchmark's shapes, and
    it may stay in L2). The whole L2 counts, as a lower bound should: where the inputs and
    what the second kernel writes do not fit in L2 together, stores that allocate in L2
    (plain ones) evict lines of the inputs before they are read again; only stores that do
    not (evict-first, ``__stcs``) leave all of it to the second read.
    """
    if which == "forward":
        return 3 * nbytes - min(nbytes, l2)
    if which == "backward":
        return 5 * nbytes - min(2 * nbytes, l2)
    raise ValueError(f"which must be 'forward' or 'backward', got {which!r}")


def floor_fractions(nbytes: int, fwd_ms: float, bwd_ms: float, bandwidth: float, l2: int) -> tuple:
    """Fractions of the byte floor (:func:`floor_bytes`) that a forward of ``fwd_ms`` and a
    backward of ``bwd_ms`` milliseconds reach at ``bandwidth`` bytes per second:
    ``(forward, backward, forward L2-aware, backward L2-aware)``; the first two of today's
    floor (``l2 = 0``), the last two of the floor with ``l2`` bytes of L2."""
    return tuple(floor_bytes(nbytes, which, cache) / (ms * 1e-3) / bandwidth
                 for cache in (0, l2) for which, ms in (("forward", fwd_ms), ("backward", bwd_ms)))


def copy_bandwidth():
    import torch
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), 20, warmup=1)
    return 2 * src.numel() / (ms * 1e-3)


def _inputs(shape, dtype, layout, copies):
    """``copies`` of x, dy and z (the residual), on the GPU in ``layout``."""
    import torch
    tdtype = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    gz = torch.Generator(device="cuda").manual_seed(1)      # its own: x and dy as before the residual came
    made = {"xs": [], "dys": [], "zs": []}
    for _ in range(copies):
        x = (torch.randn(shape, device="cuda", generator=g) * 2 + 1).to(tdtype)
        dy = torch.randn(shape, device="cuda", generator=g).to(tdtype)
        z = torch.randn(shape, device="cuda", generator=gz).to(tdtype)
        for key, t in (("xs", x), ("dys", dy), ("zs", z)):
            made[key].append(t.contiguous(memory_format=torch.channels_last) if layout == "NHWC" else t)
    return made["xs"], made["dys"], made["zs"]


def _array(t):
    """The torch tensor ``t`` as an array of cusyncbn's backend, sharing its memory: CuPy on a
    GPU, NumPy on the CPU (where the benchmark's checks run in the tests)."""
    if t.is_cuda:
        import cupy
        return cupy.from_dlpack(t.detach())
    return t.detach().numpy()


def _array_module(t):
    if t.is_cuda:
        import cupy
        return cupy
    import numpy
    return numpy


# The forms of the layer the benchmark runs: plain batch norm, y = relu(BN(x)) and
# y = relu(BN(x) + z). The last one's results include dz, the residual's gradient.
BN, RELU, ADD_RELU = "bn", "relu", "add+relu"


def _expected(x, dy, w, b, z, form):
    """What an implementation of ``form`` must give, from the float64 reference
    (``cusyncbn._reference``, its fused forms), computed where the inputs live:
    ``(results, pre)``; results ``(y, dx)``, plus ``dz`` for ``ADD_RELU``, as torch tensors of
    x's logical (N, C, ...) layout; ``pre`` the pre-activation ``BN(x)`` (``+ z``) of the ReLU
    forms (None for ``BN``), for :func:`check`."""
    import torch
    xp = _array_module(x)
    xd, dyd, wd, bd, zd = (_array(t.detach().double()) for t in (x, dy, w, b, z))
    residual = zd if form == ADD_RELU else None
    activation = None if form == BN else "relu"
    y = _reference.fused_forward(xd, wd, bd, EPS, "NCHW", residual=residual, activation=activation, xp=xp)[0]
    grads = _reference.fused_backward(xd, dyd, wd, bd, EPS, "NCHW", residual=residual, activation=activation, xp=xp)
    results = (y, grads[0]) + ((grads[3],) if form == ADD_RELU else ())
    pre = None if form == BN else _reference.fused_forward(xd, wd, bd, EPS, "NCHW", residual=residual, xp=xp)[0]
    return tuple(torch.from_dlpack(a) for a in results), None if pre is None else torch.from_dlpack(pre)


def check(results, expected, dtype, pre=None):
    """``(largest absolute error, within tolerance)`` of an implementation's ``results``
    against the reference's ``expected`` (tensors, pairwise). With ``pre`` (the ReLU forms),
    the gradients are not compared where the float64 pre-activation lies within the dtype's
    tolerance of 0: there the rounding of a correct implementation may decide the mask
    either way (PyTorch rounds BN(x) to the dtype before it adds z), and a flipped mask moves
    dx and dz at that element by about dy."""
    kink = None if pre is None else pre.abs() <= TOL[dtype]
    err = 0.0
    for i, (r, e) in enumerate(zip(results, expected, strict=True)):
        diff = (r.detach().double() - e).abs()
        if i and kink is not None:                          # dx, dz; y is compared everywhere
            diff = diff.masked_fill(kink, 0.0)
        err = max(err, float(diff.max()))
    return err, err <= TOL[dtype] * 10


OURS, CUDNN, TORCH_SYNC, NAIVE = "cusyncbn", "torch cuDNN (unsynced)", "torch SyncBN path", "naive CuPy"
OURS_RELU, CUDNN_RELU = "cusyncbn BN+ReLU", "torch cuDNN + relu"
OURS_ADD_RELU, CUDNN_ADD_RELU = "cusyncbn BN+add+ReLU", "torch cuDNN + z, relu"


def _impls(shape, layout, sync_group, comm=None):
    """name -> (form, factory): ``factory(x, dy, w, b, z)`` runs one forward+backward of that
    implementation on those torch tensors and returns ``(forward(), backward(), results)``,
    results being what :func:`_expected` gives for ``form``, in x's logical layout. cusyncbn
    runs on ``comm`` (None: the benchmark's 1-rank NCCL communicator) with CuPy arrays, or
    NumPy arrays for CPU tensors; PyTorch's synchronized path on ``sync_group``."""
    import torch
    c = shape[1]
    perm, inv = ((0, 2, 3, 1), (0, 3, 1, 2)) if layout == "NHWC" else ((0, 1, 2, 3), (0, 1, 2, 3))

    def cusyncbn_impl(form):
        def make(x, dy, w, b, z):
            from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
            xp = _array_module(x)
            on = _nccl_comm() if comm is None else comm
            rm, rv = xp.zeros(c, xp.float32), xp.ones(c, xp.float32)
            wc, bc = _array(w), _array(b)
            wg, bg = xp.zeros(c, xp.float32), xp.zeros(c, xp.float32)
            xc, dyc = _array(x.permute(*perm)), _array(dy.permute(*perm))
            fused = {} if form == BN else {"activation": "relu"}
            if form == ADD_RELU:
                fused["residual"] = _array(z.permute(*perm))
            out = {}

            def fwd():
                if "ctx" in out:
                    out["ctx"].release()
                out["y"], out["ctx"] = sync_batch_norm(xc, rm, rv, wc, bc, data_format=layout, comm=on, **fused)

            def bwd():                                     # a layer's backward: dx, the gradients (and dz)
                out["grads"] = sync_batch_norm_backward(out["ctx"], dyc, weight_grad_out=wg, bias_grad_out=bg,
                                                        retain=True)
            fwd()
            bwd()
            results = (out["y"], out["grads"][0]) + ((out["grads"][3],) if form == ADD_RELU else ())
            return fwd, bwd, tuple(torch.from_dlpack(a).permute(*inv) for a in results)
        return make

    def torch_impl(form, sync=False):
        """PyTorch's batch norm (cuDNN's kernels where it picks them; its synchronized path
        with ``sync``), then for the fused forms ``+ z`` and ``torch.relu`` as separate ops."""
        def make(x, dy, w, b, z):
            rm, rv = torch.zeros(c, device=x.device), torch.ones(c, device=x.device)
            xg, wg, bg, zg = (t.detach().requires_grad_() for t in (x, w, b, z))
            wrt = [xg, wg, bg] + ([zg] if form == ADD_RELU else [])
            if sync:
                from torch.nn.modules._functions import SyncBatchNorm

                def bn():
                    return SyncBatchNorm.apply(xg, wg, bg, rm, rv, EPS, 0.1, sync_group, 1)
            else:
                def bn():
                    return torch.nn.functional.batch_norm(xg, rm, rv, wg, bg, training=True, eps=EPS)
            epilogue = {BN: lambda t: t, RELU: torch.relu, ADD_RELU: lambda t: torch.relu(t + zg)}[form]
            out = {}

            def fwd():
                out["y"] = epilogue(bn())

            def bwd():
                out["grads"] = torch.autograd.grad(out["y"], wrt, dy, retain_graph=True)
            fwd()
            bwd()
            return fwd, bwd, (out["y"], out["grads"][0]) + ((out["grads"][3],) if form == ADD_RELU else ())
        return make

    def naive_impl(x, dy, w, b, z):
        import cupy
        axes = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
        xc, dyc = cupy.from_dlpack(x.permute(*perm)), cupy.from_dlpack(dy.permute(*perm))
        shp = (1, c, 1, 1) if layout == "NCHW" else (1, 1, 1, c)
        wc, bc = cupy.from_dlpack(w.detach()).reshape(shp), cupy.from_dlpack(b.detach()).reshape(shp)
        out = {}

        def fwd():
            mean = xc.mean(axis=axes, keepdims=True, dtype=cupy.float32)
            var = xc.var(axis=axes, keepdims=True, dtype=cupy.float32)
            out["invstd"] = 1 / cupy.sqrt(var + EPS)
            out["mean"] = mean
            out["y"] = ((xc - mean) * out["invstd"] * wc + bc).astype(xc.dtype)

        def bwd():
            xhat = (xc - out["mean"]) * out["invstd"]
            g = dyc.astype(cupy.float32)
            dx = wc * out["invstd"] * (g - g.mean(axis=axes, keepdims=True)
                                      - xhat * (g * xhat).mean(axis=axes, keepdims=True))
            out["dx"] = dx.astype(xc.dtype)
        fwd()
        bwd()
        return fwd, bwd, tuple(torch.from_dlpack(out[k]).permute(*inv) for k in ("y", "dx"))

    return {OURS: (BN, cusyncbn_impl(BN)), CUDNN: (BN, torch_impl(BN)), TORCH_SYNC: (BN, torch_impl(BN, sync=True)),
            NAIVE: (BN, naive_impl),
            OURS_RELU: (RELU, cusyncbn_impl(RELU)), CUDNN_RELU: (RELU, torch_impl(RELU)),
            OURS_ADD_RELU: (ADD_RELU, cusyncbn_impl(ADD_RELU)), CUDNN_ADD_RELU: (ADD_RELU, torch_impl(ADD_RELU))}


HOST_SHAPE = (2, 64, 8, 8)       # tiny: the host, not the GPU, bounds a call's time


def _host_us_per_call(step, calls_per_step, n=2000):
    """Host microseconds per call of ``step()`` (which makes ``calls_per_step`` calls),
    averaged over ``n`` steps after a warm-up, with no synchronization between steps."""
    import torch
    return host_us(step, n, warmup=20, synchronize=torch.cuda.synchronize) / calls_per_step


def host_overhead_us():
    """Host time of one public layer call, averaged over training forward+backward pairs on a
    tiny input (no syncs between calls). Returns it and whether the layer's results are
    still right afterwards."""
    import cupy
    import cusyncbn
    bn = cusyncbn.SyncBatchNorm(HOST_SHAPE[1], comm=_nccl_comm(), device=f"gpu:{cupy.cuda.Device().id}")
    x = cupy.random.standard_normal(HOST_SHAPE, dtype=cupy.float32)
    dy = cupy.ones_like(x)

    def step():
        bn(x)
        bn.backward(dy)
    us = _host_us_per_call(step, 2)
    check = cusyncbn.SyncBatchNorm(HOST_SHAPE[1], device=bn.device)      # a fresh layer, batch statistics
    with cusyncbn.no_grad():
        same = bool(cupy.allclose(bn(x), check(x), rtol=1e-5, atol=1e-5))
    return us, same


def torch_host_us():
    """Host time of one ``torch.nn.functional.batch_norm`` call (cuDNN), a training forward
    that records its backward, on the same tiny input and timed as :func:`host_overhead_us`
    times ours: PyTorch's per-call cost, the target for ours."""
    import torch
    c = HOST_SHAPE[1]
    x = torch.randn(HOST_SHAPE, device="cuda", requires_grad=True)
    w = torch.ones(c, device="cuda", requires_grad=True)
    b = torch.zeros(c, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    return _host_us_per_call(lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True, eps=1e-5), 1)


def eval_host_us():
    """Host time of one eval forward of the public layer (under ``no_grad``) on the tiny input:
    the eval target is at most half of ``F.batch_norm``'s training call."""
    import cupy
    import cusyncbn
    bn = cusyncbn.SyncBatchNorm(HOST_SHAPE[1], comm=_nccl_comm(), device=f"gpu:{cupy.cuda.Device().id}").eval()
    x = cupy.random.standard_normal(HOST_SHAPE, dtype=cupy.float32)

    def step():
        with cusyncbn.no_grad():
            bn(x)
    return _host_us_per_call(step, 1)


def module_host_us():
    """Host time of one module call (a training forward recording its backward) of
    ``cusyncbn.torch.SyncBatchNorm`` and of ``torch.nn.BatchNorm2d``, same tiny input, same
    run: ``(ours, torch's)``."""
    import torch
    import cusyncbn.torch as cbt
    c = HOST_SHAPE[1]
    x = torch.randn(HOST_SHAPE, device="cuda", requires_grad=True)
    ours = cbt.SyncBatchNorm(c, comm=_nccl_comm()).cuda()
    theirs = torch.nn.BatchNorm2d(c).cuda()
    return _host_us_per_call(lambda: ours(x), 1), _host_us_per_call(lambda: theirs(x), 1)


def _rotating(runs, which):
    """A call of ``which`` (0: the forward, 1: the backward) of ``runs`` (one per copy of the
    inputs), each call on the next copy, so that the working set exceeds L2."""
    turn = itertools.cycle(runs)
    return lambda: next(turn)[which]()


def _configurations(shapes, rotate, l2=L2_FALLBACK_BYTES):
    """(shape, dtype, layout, numel, itemsize, xs, dys, zs, w, b) for every configuration
    (:func:`configurations`' order); with ``rotate``, enough copies of x, dy and z that cycling
    through them exceeds ``l2`` bytes of L2."""
    import torch
    for shape, dtype, layout in configurations(shapes):
        numel = math.prod(shape)
        itemsize = ITEMSIZE[dtype]
        copies = max(1, -(-2 * l2 // (numel * itemsize))) if rotate else 1
        xs, dys, zs = _inputs(shape, dtype, layout, copies)
        w = torch.rand(shape[1], device="cuda") + 0.5
        b = torch.randn(shape[1], device="cuda")
        yield shape, dtype, layout, numel, itemsize, xs, dys, zs, w, b
        del xs, dys, zs
        torch.cuda.empty_cache()


def _l2_emptier(l2):
    """A call that leaves none of the benchmark's data in the GPU's L2 (of ``l2`` bytes), and
    no dirty line: it sums a buffer of 3 * ``l2`` bytes, a read that evicts (and writes back)
    whatever the L2 held, then waits for it."""
    import torch
    sweep = torch.zeros(3 * l2 // 4, dtype=torch.float32, device="cuda")

    def empty():
        sweep.sum()
        torch.cuda.synchronize()
    return empty


def profile(shapes, group):
    """One warmed-up training forward+backward of cusyncbn, cuDNN and PyTorch's sync path
    per configuration (:func:`configurations`' order; the warm-up outside the profiled
    ranges), each pass between its own ``cudaProfilerStart`` and ``cudaProfilerStop``, after
    an unprofiled read that empties the L2: each pass starts cold, as in training, where other
    layers run between a layer's forward and its backward, so that an Nsight Compute run that
    does not flush the L2 itself (``--cache-control none``) sees in each pass's second kernel
    what the first left in L2 and nothing of earlier work (:func:`dram_table`)."""
    import torch
    empty_l2 = _l2_emptier(l2_bytes())
    for shape, dtype, layout, _, _, xs, dys, zs, w, b in _configurations(shapes, rotate=False):
        for name, (_, make) in _impls(shape, layout, group).items():
            if name not in (OURS, CUDNN, TORCH_SYNC):
                continue
            fwd, bwd, _ = make(xs[0], dys[0], w, b, zs[0])        # runs a forward+backward: the warm-up
            torch.cuda.synchronize()
            print(f"profiled: {name} {shape} {dtype} {layout}", flush=True)
            for step in (fwd, bwd):
                empty_l2()
                torch.cuda.profiler.start()
                step()
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()


class Row(NamedTuple):
    """One implementation timed on one configuration. The fractions are of the byte floor
    (:func:`floor_bytes`) at the measured copy bandwidth: ``*_floor`` of today's (3N / 5N),
    ``*_l2_floor`` of the L2-aware one; NaN for the fused forms, which have no floor here."""
    shape: tuple
    dtype: str
    layout: str
    name: str
    fwd_ms: float
    fwd_floor: float
    bwd_ms: float
    bwd_floor: float
    err: float
    ok: bool
    fwd_l2_floor: float = math.nan
    bwd_l2_floor: float = math.nan


def _pct(fraction):
    return "-" if math.isnan(fraction) else f"{fraction:.0%}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three shapes, fewer repetitions")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="time nothing: one warmed-up forward+backward per configuration between "
                             "cudaProfilerStart/Stop, for ncu --profile-from-start off")
    parser.add_argument("--sweep", action="store_true",
                        help="tune the kernels' launch configurations on this GPU (each checked against the "
                             "float64 reference first) and write the table to OUT/tuning.json (commit it as "
                             "cusyncbn/_kernels/tuning.json to ship it)")
    parser.add_argument("--model", action="store_true",
                        help="run only the whole-model benchmark: a ResNet-50 training step, plain vs converted "
                             "by cusyncbn.torch.convert_sync_batchnorm (needs torchvision); writes model.md")
    parser.add_argument("--dram-table", metavar="NCU_CSV",
                        help="time nothing: read Nsight Compute's raw CSV (ncu --csv --page raw) of a --profile run "
                             "(with --quick if that run had it) and print cusyncbn's DRAM bytes per pass against the "
                             "byte floors, graded: forward <= 2.3N on inputs below 40 MiB (no GPU needed)")
    parser.add_argument("--l2-mib", type=float, default=None,
                        help="with --dram-table: the L2 size for the L2-aware floor (default: this GPU's, else 60)")
    args = parser.parse_args(argv)
    if args.dram_table:
        l2 = l2_bytes() if args.l2_mib is None else int(args.l2_mib * 2**20)
        return dram_main(args.dram_table, QUICK_SHAPES if args.quick else SHAPES, l2)
    if args.model:
        from cusyncbn._bench_model import main as model_main
        return model_main(out=args.out, reps=args.reps, quick=args.quick)
    try:
        importlib.import_module("cupy")
        import torch
        usable = torch.cuda.is_available()
    except ImportError as exc:
        print(f"cusyncbn.bench needs torch and CuPy: {exc}", file=sys.stderr)
        return 2
    if not usable:
        print("cusyncbn.bench needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.sweep:
        from cusyncbn._sweep import run_sweep
        run_sweep(shapes=QUICK_SHAPES if args.quick else SHAPES, dtypes=DTYPES, layouts=LAYOUTS, reps=args.reps or 20,
                  out=args.out)
        return 0
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.profile:
        profile(shapes, dist.group.WORLD)
        return 0
    reps = args.reps or (20 if args.quick else 50)
    bw = copy_bandwidth()
    l2 = l2_bytes()
    card = torch.cuda.get_device_name()
    print(f"{card}: device-to-device copy {bw / 1e12:.2f} TB/s, L2 {l2 / 2**20:.0f} MiB", flush=True)
    rows = []
    for shape, dtype, layout, numel, itemsize, xs, dys, zs, w, b in _configurations(shapes, rotate=True, l2=l2):
        expected = {}
        runs = []
        for name, (form, make) in _impls(shape, layout, dist.group.WORLD).items():
            if name == NAIVE and dtype == "bfloat16":
                continue
            try:
                runs = [make(x, dy, w, b, z) for x, dy, z in zip(xs, dys, zs)]
            except Exception as exc:
                print(f"  {name} {shape} {dtype} {layout}: failed ({type(exc).__name__}: {exc})")
                continue
            if form not in expected:
                expected[form] = _expected(xs[0], dys[0], w, b, zs[0], form)
            err, ok = check(runs[0][2], expected[form][0], dtype, pre=expected[form][1])
            fwd_ms = cuda_ms(_rotating(runs, 0), reps, warmup=1)
            bwd_ms = cuda_ms(_rotating(runs, 1), reps, warmup=1)
            fractions = floor_fractions(numel * itemsize, fwd_ms, bwd_ms, bw, l2) if form == BN else (math.nan,) * 4
            r = Row(shape, dtype, layout, name, fwd_ms, fractions[0], bwd_ms, fractions[1], err, ok, *fractions[2:])
            rows.append(r)
            print(f"  {str(shape):20s} {dtype:9s} {layout} {name:24s} fwd {fwd_ms:7.3f} ms "
                  f"({_pct(r.fwd_floor):>4s}, L2 {_pct(r.fwd_l2_floor):>4s}) bwd {bwd_ms:7.3f} ms "
                  f"({_pct(r.bwd_floor):>4s}, L2 {_pct(r.bwd_l2_floor):>4s}) err {err:.1e}{'' if ok else ' WRONG'}",
                  flush=True)
        del xs, dys, zs, runs, expected
    overhead, same = host_overhead_us()
    torch_us = torch_host_us()
    print(f"host overhead of one cusyncbn layer call: {overhead:.1f} us (results right afterwards: {same}); "
          f"torch.nn.functional.batch_norm: {torch_us:.1f} us")
    print(predicted_line(overhead), flush=True)
    host = {"call": overhead, "F.batch_norm": torch_us, "eval": eval_host_us()}
    host["module"], host["nn.BatchNorm2d"] = module_host_us()
    _write(args.out, card, bw, rows, overhead, torch_us, host, l2=l2)
    return 0


LARGE_BYTES = 64 << 20          # "large shapes" of the targets: inputs of 64 MiB or more
# The targets, per (shape, dtype, layout) unless said otherwise:
FLOOR_TARGET = 0.85             # fraction of today's byte floor (3N / 5N), forward and backward, on large shapes
CUDNN_TARGET = 1.0              # fwd+bwd speed-up over cuDNN's unsynced batch norm
SYNC_TARGET = 2.0               # fwd+bwd speed-up over PyTorch's synchronized path
FUSED_TARGET = 1.3              # fused BN+ReLU (BN+add+ReLU) fwd+bwd over cuDNN then relu (+ z, relu), large shapes
SMALL_BYTES = 40 << 20          # "inputs below 40 MiB" of the DRAM target (graded by dram_table, from ncu)
DRAM_TARGET = 2.3               # forward DRAM bytes over N, at most, on inputs below SMALL_BYTES
HOST_TARGET = 1.0               # host time per call over F.batch_norm's (at most), once per run
EVAL_HOST_TARGET = 0.5          # an eval forward's host time over F.batch_norm's training call
MODULE_HOST_TARGET = 1.3        # cusyncbn.torch module call over torch.nn.BatchNorm2d's
FUSED = ((OURS_RELU, CUDNN_RELU, "BN+ReLU"), (OURS_ADD_RELU, CUDNN_ADD_RELU, "BN+add+ReLU"))
TARGETS = (f"Targets: >= {FLOOR_TARGET:.0%} of the byte floor (3N / 5N) per pass on large shapes (inputs of "
           f"{LARGE_BYTES >> 20} MiB or more); fwd+bwd >= {CUDNN_TARGET:.1f}x cuDNN's unsynced batch norm and "
           f">= {SYNC_TARGET:.1f}x PyTorch's sync path on every shape; fused BN+ReLU and BN+add+ReLU fwd+bwd >= "
           f"{FUSED_TARGET:.1f}x cuDNN's batch norm then torch.relu (then + z, relu) on large shapes; host time "
           f"per call <= {HOST_TARGET:.1f}x F.batch_norm's. Graded apart (Nsight Compute, bash .ci/gpu profile: "
           f"python -m cusyncbn.bench --dram-table): forward DRAM bytes <= {DRAM_TARGET}N on inputs below "
           f"{SMALL_BYTES >> 20} MiB.")


def summary(rows):
    """Per (shape, dtype, layout): cusyncbn's fractions of both byte floors, its speed-ups
    over PyTorch's synchronized path and cuDNN, and its fused forms' over cuDNN followed by
    the separate ops (forward + backward), with the targets it misses (a missing comparison
    counts as missed; a wrong result as WRONG, naming the fused form)."""
    by = {}
    for r in rows:
        by.setdefault((r.shape, r.dtype, r.layout), {})[r.name] = r
    lines = ["| shape | dtype | layout | fwd % floor | bwd % floor | fwd % L2-aware floor | bwd % L2-aware floor | "
             "x vs torch SyncBN | x vs cuDNN | BN+ReLU x vs cuDNN, relu | BN+add+ReLU x vs cuDNN, + z, relu | "
             "targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (shape, dtype, layout), impls in by.items():
        ours = impls.get(OURS)
        if ours is None:
            continue
        large = math.prod(shape) * ITEMSIZE[dtype] >= LARGE_BYTES
        vs_sync, vs_cudnn = (_speedup(impls.get(other), ours) for other in (TORCH_SYNC, CUDNN))
        vs_fused = [_speedup(impls.get(theirs), impls.get(fused)) for fused, theirs, _ in FUSED]
        misses = [] if ours.ok else ["WRONG"]
        misses += [f"WRONG {what}" for (fused, _, what) in FUSED if fused in impls and not impls[fused].ok]
        if large and min(ours.fwd_floor, ours.bwd_floor) < FLOOR_TARGET:
            misses.append(f"< {FLOOR_TARGET:.0%} floor")
        if not vs_cudnn >= CUDNN_TARGET:
            misses.append("slower than cuDNN")
        if not vs_sync >= SYNC_TARGET:
            misses.append(f"< {SYNC_TARGET:g}x sync")
        if large:
            misses += [f"{what} < {FUSED_TARGET:g}x" for (_, _, what), ratio in zip(FUSED, vs_fused)
                       if not ratio >= FUSED_TARGET]
        floors = " | ".join(_pct(f) for f in (ours.fwd_floor, ours.bwd_floor, ours.fwd_l2_floor, ours.bwd_l2_floor))
        fused = " | ".join(f"{ratio:.2f}" for ratio in vs_fused)
        lines.append(f"| {shape} | {dtype} | {layout} | {floors} | {vs_sync:.1f} | {vs_cudnn:.2f} | {fused} | "
                     f"{', '.join(misses) or 'met'} |")
    return lines


def _speedup(other, ours):
    """How many times faster ``ours`` is than ``other`` (two :class:`Row`), forward +
    backward; NaN when either was not measured (None)."""
    if other is None or ours is None:
        return math.nan
    return (other.fwd_ms + other.bwd_ms) / (ours.fwd_ms + ours.bwd_ms)


# The DRAM table (the second read from L2): Nsight Compute's DRAM bytes of each cusyncbn pass that
# --profile runs, from an ncu run that leaves the L2 alone between kernels (.ci/gpu, part
# "profile": --cache-control none, these metrics only, cusyncbn's kernels only).
DRAM_METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "launch__grid_size")
KERNEL_REGEX = "^(moments|normalize|backward|dx)_"      # ncu --kernel-name regex:, on --kernel-name-base function
PASSES = (("forward", ("moments", "normalize")), ("backward", ("backward", "dx")))


class DramPass(NamedTuple):
    """One pass of cusyncbn as Nsight Compute measured it: ``which`` ("forward", "backward"), its
    two kernels (:class:`cusyncbn._ncu.Kernel`, in order) and their DRAM bytes read and written
    together."""
    which: str
    kernels: tuple
    read: float
    write: float

    def dram(self, nbytes):
        """The pass's DRAM bytes for an input of ``nbytes``: what it read, plus what it wrote but
        at least ``nbytes``. A write reaches DRAM only when its line leaves the L2 (a write-back
        cache); what the L2 still holds when a kernel ends is written back later, in whichever
        kernel then evicts it, or never within the profile (the 2026-11-29 profile: 8.0 of the
        25.7 MB that a (64, 2048, 7, 7) float32 normalize wrote, 0.0 of the 12.8 MB in bfloat16 NHWC).
        The pass's output (y, dx: ``nbytes``) counts at least once, as every write does in
        :func:`floor_bytes`."""
        return self.read + max(self.write, nbytes)


def _family(name):
    """"moments", "normalize", "backward" or "dx" for a kernel of cusyncbn's passes (any form of
    its name that ncu prints), else None."""
    found = re.match(KERNEL_REGEX, _ncu.kernel_base(name))
    return found[1] if found else None


def dram_passes(raw, shapes):
    """cusyncbn's passes in ``raw`` (a :class:`cusyncbn._ncu.RawProfile` of a ``--profile`` run
    on ``shapes``), matched with the configurations that run profiled: a list of ``((shape,
    dtype, layout), forward, backward)``, the passes as :class:`DramPass`. The profile must hold
    exactly a moments, a normalize, a backward and a dx kernel per configuration, in that
    order, each with both DRAM byte counts; other kernels (cuDNN's, PyTorch's, NCCL's, where
    ncu's filter let them in) are left out. Raises ValueError saying what does not match."""
    configs = configurations(shapes)
    order = [family for _, families in PASSES for family in families]
    ours = [k for k in raw.kernels if _family(k.name)]
    if len(ours) != len(order) * len(configs):
        counts = ", ".join(f"{family} {sum(_family(k.name) == family for k in ours)}" for family in order)
        raise ValueError(f"{len(ours)} cusyncbn kernels in the profile ({counts}), but {len(order) * len(configs)} "
                         f"expected: {len(order)} ({', '.join(order)}) for each of the {len(configs)} configurations "
                         f"of {len(shapes)} shapes (was the profile run with --quick, and this without, or the "
                         "other way round?)")
    for i, k in enumerate(ours):
        if _family(k.name) != order[i % len(order)]:
            raise ValueError(f"cusyncbn kernel {i} of the profile (ncu ID {k.id}) is {k.name!r}, where a "
                             f"{order[i % len(order)]}_ kernel was expected (configuration {i // len(order)}: "
                             f"{' '.join(map(str, configs[i // len(order)]))})")
        for metric in DRAM_METRICS[:2]:
            if math.isnan(k.metrics.get(metric, math.nan)):
                raise ValueError(f"kernel {k.name!r} (ncu ID {k.id}) has no number for {metric} "
                                 f"({k.cells.get(metric, 'no such column')!r})")
    matched = []
    for c, config in enumerate(configs):
        passes = []
        for p, (which, _) in enumerate(PASSES):
            pair = tuple(ours[len(order) * c + 2 * p:len(order) * c + 2 * p + 2])
            passes.append(DramPass(which, pair, sum(k.metrics["dram__bytes_read.sum"] for k in pair),
                                   sum(k.metrics["dram__bytes_write.sum"] for k in pair)))
        matched.append((config, *passes))
    return matched


def _times_n(value, nbytes):
    return f"{value / nbytes:.2f}N"


def _blocks(kernel):
    blocks = kernel.metrics.get("launch__grid_size", math.nan)
    return (kernel.grid or "?") if math.isnan(blocks) else f"{blocks:.0f}"


def dram_table(raw, shapes, l2):
    """The DRAM table of ``raw`` (:func:`dram_passes`), as lines of text: per kernel, then per
    configuration each pass's DRAM bytes read, written and in all (:meth:`DramPass.dram`) over
    N, the input's bytes, beside its floors (:func:`floor_bytes`: 3N / 5N, and the L2-aware one
    with ``l2`` bytes of L2), then the target: forward DRAM bytes <= 2.3N on inputs below 40
    MiB. Not graded (said so) where ncu replayed one of cusyncbn's kernels more than once: it
    then restores the memory between the replay passes, and the L2 the last pass sees is not
    the run's."""
    matched = dram_passes(raw, shapes)
    replays = [(name, n) for name, n in raw.passes if _family(name)]
    replayed = [name for name, n in replays if n > 1]
    lines = ["| shape | dtype | layout | kernel | blocks | DRAM read | DRAM write |", "|---|---|---|---|---|---|---|"]
    for (shape, dtype, layout), *passes in matched:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        for k in (k for p in passes for k in p.kernels):
            lines.append(f"| {shape} | {dtype} | {layout} | `{k.name}` | {_blocks(k)} | "
                         f"{_times_n(k.metrics['dram__bytes_read.sum'], nbytes)} | "
                         f"{_times_n(k.metrics['dram__bytes_write.sum'], nbytes)} |")
    lines += ["", f"DRAM bytes per cusyncbn pass (Nsight Compute), in N = the input's bytes. read, write: the "
              "pass's two kernels together; DRAM: read + max(write, N) (the L2 writes back: what it still "
              "holds when a kernel ends is not counted there, so the output counts at least once); floors: "
              f"3N / 5N and the L2-aware floor (L2 {l2 / 2**20:.0f} MiB).", "",
              "| shape | dtype | layout | N MiB | fwd read | fwd write | fwd DRAM | fwd floor: 3N, L2-aware | "
              "bwd read | bwd write | bwd DRAM | bwd floor: 5N, L2-aware | forward <= 2.3N (below 40 MiB) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    graded, missed = 0, []
    for (shape, dtype, layout), *passes in matched:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        cells = []
        for p in passes:
            floors = ", ".join(_times_n(floor_bytes(nbytes, p.which, cache), nbytes) for cache in (0, l2))
            cells += [_times_n(p.read, nbytes), _times_n(p.write, nbytes), _times_n(p.dram(nbytes), nbytes), floors]
        ratio = passes[0].dram(nbytes) / nbytes
        if nbytes >= SMALL_BYTES:
            verdict = "-"
        elif replayed:
            verdict = "not graded"
        else:
            graded += 1
            verdict = "met" if round(ratio, 6) <= DRAM_TARGET else f"> {DRAM_TARGET}N"
            if verdict != "met":
                missed.append(f"{shape} {dtype} {layout} {ratio:.2f}N")
        lines.append(f"| {shape} | {dtype} | {layout} | {nbytes / 2**20:.1f} | {' | '.join(cells)} | {verdict} |")
    target = f"Target: inputs below {SMALL_BYTES >> 20} MiB: forward DRAM bytes <= {DRAM_TARGET}N: "
    if replayed:
        target += (f"not graded: ncu replayed {len(replayed)} of cusyncbn's kernels more than once (e.g. "
                   f"{replayed[0]!r}); between replay passes it restores memory, and the cache state is not the "
                   "run's: profile the DRAM bytes alone (.ci/gpu, part profile)")
    else:
        target += f"met on {graded - len(missed)} of {graded}" + (f" (missed: {'; '.join(missed)})" if missed else "")
        target += (f"; one replay pass for each of the {len(replays)} kernels ncu named" if replays else
                   "; ncu named no replay passes in the file: check that each kernel took one")
    return lines + ["", target]


def dram_main(path, shapes, l2):
    """``--dram-table PATH``: print :func:`dram_table` of the raw CSV at ``path``; 0, or 2 with
    the reason when it cannot be read or does not match the configurations of ``shapes``."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = dram_table(_ncu.read_raw(f.read()), shapes, l2)
    except (OSError, ValueError) as exc:
        print(f"cusyncbn.bench --dram-table {path}: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def predicted_line(measured_us):
    """The measured host time per call beside the one the host-cost ledger predicts from the
    H200 unit costs (``cusyncbn._hostcost``), so the unit costs can be recalibrated per GPU."""
    from . import _hostcost
    counts = _hostcost.ledger()["training pass"]
    predicted = _hostcost.predicted_us(counts)
    return (f"host time per call: measured {measured_us:.1f} us, predicted {predicted:.1f} us from the ledger "
            f"({_hostcost.ledger_line(counts)}); measured/predicted {measured_us / predicted:.2f}")


def host_summary(ours_us, torch_us):
    """The host-time target: cusyncbn's time per layer call over F.batch_norm's, same run."""
    ratio = ours_us / torch_us
    return (f"Host time per call: cusyncbn {ours_us:.1f} us (mean of a training forward and a backward), "
            f"torch.nn.functional.batch_norm {torch_us:.1f} us (a training forward): ratio {ratio:.2f} "
            f"({'met' if ratio <= HOST_TARGET else 'missed'}: target <= {HOST_TARGET:.1f})")


def host_targets(host):
    """The three host-time targets of one run, one line each: the public layer's call (mean of a
    training forward and a backward) <= 1.0x ``F.batch_norm``'s, its eval forward <= 0.5x, the
    torch module's call <= 1.3x ``nn.BatchNorm2d``'s. ``host`` maps "call", "eval",
    "F.batch_norm", "module", "nn.BatchNorm2d" to microseconds per call."""
    lines = [host_summary(host["call"], host["F.batch_norm"])]
    for what, ours, theirs, base, target in (
            ("eval forward", host["eval"], host["F.batch_norm"], "torch.nn.functional.batch_norm", EVAL_HOST_TARGET),
            ("cusyncbn.torch module call", host["module"], host["nn.BatchNorm2d"], "torch.nn.BatchNorm2d",
             MODULE_HOST_TARGET)):
        ratio = ours / theirs
        lines.append(f"Host time, {what}: {ours:.1f} us, {base} {theirs:.1f} us: ratio {ratio:.2f} "
                     f"({'met' if ratio <= target else 'missed'}: target <= {target:.1f})")
    return "\n".join(lines)


def _write(out, card, bw, rows, overhead, torch_overhead, host=None, l2=None):
    os.makedirs(out, exist_ok=True)
    cache = "" if l2 is None else f"; L2 {l2 / 2**20:.0f} MiB (the L2-aware floor's)"
    head = (f"Card: {card}; date: {time.strftime('%Y-%m-%d')}; copy bandwidth {bw / 1e12:.2f} TB/s{cache}\n\n"
            f"{host_summary(overhead, torch_overhead) if host is None else host_targets(host)}")
    lines = [head, "",
             "| shape | dtype | layout | implementation | fwd ms | fwd % floor | fwd % L2-aware floor | bwd ms | "
             "bwd % floor | bwd % L2-aware floor | max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.shape} | {r.dtype} | {r.layout} | {r.name} | {r.fwd_ms:.3f} | {_pct(r.fwd_floor)} | "
                     f"{_pct(r.fwd_l2_floor)} | {r.bwd_ms:.3f} | {_pct(r.bwd_floor)} | {_pct(r.bwd_l2_floor)} | "
                     f"{r.err:.1e}{'' if r.ok else ' WRONG'} |")
    short = summary(rows)
    lines += ["", "Summary (cusyncbn, fwd+bwd speed-ups):", "", TARGETS, ""] + short
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + head + "\n\n" + TARGETS + "\n" + "\n".join(short))
    _chart(out, [r for r in rows if not math.isnan(r.fwd_floor)])


def _chart(out, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart written", file=sys.stderr)
        return
    keys = list(dict.fromkeys((r.shape, r.dtype, r.layout) for r in rows))
    names = list(dict.fromkeys(r.name for r in rows))
    value = {((r.shape, r.dtype, r.layout), r.name): (r.fwd_floor + r.bwd_floor) / 2 for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.6), 5))
    width = 0.8 / len(names)
    for k, name in enumerate(names):                  # a missing run leaves its bar out
        xs = [i + k * width for i, key in enumerate(keys) if (key, name) in value]
        ax.bar(xs, [value[(key, name)] for key in keys if (key, name) in value], width=width, label=name)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{s}\n{d} {l}" for s, d, l in keys], rotation=90, fontsize=6)
    ax.set_ylabel("mean of fwd and bwd fraction of byte floor")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
