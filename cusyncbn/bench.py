"""Benchmark: cusyncbn vs PyTorch (cuDNN and its synchronized path) vs naive CuPy, on one GPU.

Run:
    python -m cusyncbn.bench [--quick] [--out bench_out] [--profile | --sweep]
    python -m cusyncbn.bench --profile [--quick]     # under ncu: see docs/PERFORMANCE.md
    python -m cusyncbn.bench --sweep [--out DIR]     # tune the launch configurations: DIR/tuning.json

For every shape, dtype and layout it first checks each implementation's y and dx
against the float64 reference (``cusyncbn._reference``, on the GPU), then times forward
and backward with CUDA events (median of many runs, inputs rotated so that the working
set exceeds L2), and reports each time and its fraction of the byte floor at the measured copy bandwidth
(forward reads x twice and writes y: 3 * numel * itemsize bytes; backward reads x
and dy twice and writes dx: 5 * numel * itemsize). It also measures the host time of
one cusyncbn layer call and of one ``torch.nn.functional.batch_norm`` call the same
way. It prints a table with a summary against the targets and writes them as markdown
(results.md) and, when matplotlib is installed, a chart (results.png). cusyncbn runs
with a 1-rank NCCL communicator, so the collective is really called.

``--profile`` times nothing: it runs one warmed-up training forward+backward per
configuration and implementation between ``cudaProfilerStart`` and ``cudaProfilerStop``,
so that ``ncu --profile-from-start off`` profiles exactly those kernels.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import math
import os
import sys
import time

from . import _reference
from ._bench_cases import DTYPES, LAYOUTS, QUICK_SHAPES, SHAPES, cuda_ms, host_us, nccl_comm as _nccl_comm

L2_BYTES = 50 << 20
TOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}


def copy_bandwidth():
    import torch
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), 20, warmup=1)
    return 2 * src.numel() / (ms * 1e-3)


def _inputs(shape, dtype, layout, copies):
    import torch
    tdtype = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    xs, dys = [], []
    for _ in range(copies):
        x = (torch.randn(shape, device="cuda", generator=g) * 2 + 1).to(tdtype)
        dy = torch.randn(shape, device="cuda", generator=g).to(tdtype)
        if layout == "NHWC":
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        xs.append(x)
        dys.append(dy)
    return xs, dys


def _expected(x, dy, w, b, eps):
    """y and dx of the float64 reference (``cusyncbn._reference``), computed on the GPU."""
    import cupy
    import torch
    xd, dyd, wd, bd = (cupy.from_dlpack(t.detach().double()) for t in (x, dy, w, b))
    y = _reference.forward(xd, wd, bd, eps, "NCHW", xp=cupy)[0]
    dx = _reference.backward(xd, dyd, wd, eps, "NCHW", xp=cupy)[0]
    return torch.from_dlpack(y), torch.from_dlpack(dx)


def _impls(shape, layout, sync_group):
    """name -> factory(x, dy, w, b) -> (forward(), backward(), y, dx) all on torch tensors."""
    import torch
    import cupy
    c = shape[1]

    def cusyncbn_impl(x, dy, w, b):
        from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
        comm = _nccl_comm()
        rm, rv = cupy.zeros(c, cupy.float32), cupy.ones(c, cupy.float32)
        wc, bc = cupy.from_dlpack(w.detach()), cupy.from_dlpack(b.detach())
        wg, bg = cupy.zeros(c, cupy.float32), cupy.zeros(c, cupy.float32)
        perm = (0, 2, 3, 1) if layout == "NHWC" else (0, 1, 2, 3)
        xc = cupy.from_dlpack(x.permute(*perm))
        dyc = cupy.from_dlpack(dy.permute(*perm))
        out = {}

        def fwd():
            if "ctx" in out:
                out["ctx"].release()
            out["y"], out["ctx"] = sync_batch_norm(xc, rm, rv, wc, bc, data_format=layout, comm=comm)

        def bwd():                                         # a layer's backward: dx and the gradients
            out["dx"], _, _ = sync_batch_norm_backward(out["ctx"], dyc, weight_grad_out=wg, bias_grad_out=bg,
                                                       retain=True)
        fwd()
        bwd()
        inv = (0, 3, 1, 2) if layout == "NHWC" else (0, 1, 2, 3)
        return fwd, bwd, torch.from_dlpack(out["y"]).permute(*inv), torch.from_dlpack(out["dx"]).permute(*inv)

    def torch_impl(sync):
        def make(x, dy, w, b):
            rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
            xg = x.detach().requires_grad_()
            wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()
            out = {}

            def fwd():
                if sync:
                    from torch.nn.modules._functions import SyncBatchNorm as F
                    out["y"] = F.apply(xg, wg, bg, rm, rv, 1e-5, 0.1, sync_group, 1)
                else:
                    out["y"] = torch.nn.functional.batch_norm(xg, rm, rv, wg, bg, training=True, eps=1e-5)

            def bwd():
                out["dx"] = torch.autograd.grad(out["y"], [xg, wg, bg], dy, retain_graph=True)[0]
            fwd()
            bwd()
            return fwd, bwd, out["y"], out["dx"]
        return make

    def naive_impl(x, dy, w, b):
        axes = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
        perm = (0, 2, 3, 1) if layout == "NHWC" else (0, 1, 2, 3)
        xc, dyc = cupy.from_dlpack(x.permute(*perm)), cupy.from_dlpack(dy.permute(*perm))
        shp = (1, c, 1, 1) if layout == "NCHW" else (1, 1, 1, c)
        wc, bc = cupy.from_dlpack(w.detach()).reshape(shp), cupy.from_dlpack(b.detach()).reshape(shp)
        out = {}

        def fwd():
            mean = xc.mean(axis=axes, keepdims=True, dtype=cupy.float32)
            var = xc.var(axis=axes, keepdims=True, dtype=cupy.float32)
            out["invstd"] = 1 / cupy.sqrt(var + 1e-5)
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
        inv = (0, 3, 1, 2) if layout == "NHWC" else (0, 1, 2, 3)
        return fwd, bwd, torch.from_dlpack(out["y"]).permute(*inv), torch.from_dlpack(out["dx"]).permute(*inv)

    return {"cusyncbn": cusyncbn_impl, "torch cuDNN (unsynced)": torch_impl(False),
            "torch SyncBN path": torch_impl(True), "naive CuPy": naive_impl}


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


def _configurations(shapes, rotate):
    """(shape, dtype, layout, numel, itemsize, xs, dys, w, b) for every configuration; with
    ``rotate``, enough copies of x and dy that cycling through them exceeds L2."""
    import torch
    for shape in shapes:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                numel = math.prod(shape)
                itemsize = 4 if dtype == "float32" else 2
                copies = max(1, -(-2 * L2_BYTES // (numel * itemsize))) if rotate else 1
                xs, dys = _inputs(shape, dtype, layout, copies)
                w = torch.rand(shape[1], device="cuda") + 0.5
                b = torch.randn(shape[1], device="cuda")
                yield shape, dtype, layout, numel, itemsize, xs, dys, w, b
                del xs, dys
                torch.cuda.empty_cache()


def profile(shapes, group):
    """One warmed-up training forward+backward of cusyncbn, cuDNN and PyTorch's sync path
    per configuration, each between ``cudaProfilerStart`` and ``cudaProfilerStop``."""
    import torch
    for shape, dtype, layout, _, _, xs, dys, w, b in _configurations(shapes, rotate=False):
        for name, make in _impls(shape, layout, group).items():
            if name not in (OURS, CUDNN, TORCH_SYNC):
                continue
            fwd, bwd, _, _ = make(xs[0], dys[0], w, b)          # runs a forward+backward: the warm-up
            torch.cuda.synchronize()
            print(f"profiled: {name} {shape} {dtype} {layout}", flush=True)
            torch.cuda.profiler.start()
            fwd()
            bwd()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()


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
    args = parser.parse_args(argv)
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
    card = torch.cuda.get_device_name()
    print(f"{card}: device-to-device copy {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape, dtype, layout, numel, itemsize, xs, dys, w, b in _configurations(shapes, rotate=True):
        y_ref, dx_ref = _expected(xs[0], dys[0], w, b, 1e-5)
        runs = []
        for name, make in _impls(shape, layout, dist.group.WORLD).items():
            if name == "naive CuPy" and dtype == "bfloat16":
                continue
            try:
                runs = [make(x, dy, w, b) for x, dy in zip(xs, dys)]
            except Exception as exc:
                print(f"  {name} {shape} {dtype} {layout}: failed ({type(exc).__name__}: {exc})")
                continue
            _, _, y, dx = runs[0]
            err = max(float((y.double() - y_ref).abs().max()), float((dx.double() - dx_ref).abs().max()))
            ok = err <= TOL[dtype] * 10
            fwd_ms = cuda_ms(_rotating(runs, 0), reps, warmup=1)
            bwd_ms = cuda_ms(_rotating(runs, 1), reps, warmup=1)
            fwd_frac = 3 * numel * itemsize / (fwd_ms * 1e-3) / bw
            bwd_frac = 5 * numel * itemsize / (bwd_ms * 1e-3) / bw
            rows.append((shape, dtype, layout, name, fwd_ms, fwd_frac, bwd_ms, bwd_frac, err, ok))
            print(f"  {str(shape):20s} {dtype:9s} {layout} {name:24s} fwd {fwd_ms:7.3f} ms ({fwd_frac:4.0%}) "
                  f"bwd {bwd_ms:7.3f} ms ({bwd_frac:4.0%}) err {err:.1e}{'' if ok else ' WRONG'}", flush=True)
        del xs, dys, runs, y_ref, dx_ref
    overhead, same = host_overhead_us()
    torch_us = torch_host_us()
    print(f"host overhead of one cusyncbn layer call: {overhead:.1f} us (results right afterwards: {same}); "
          f"torch.nn.functional.batch_norm: {torch_us:.1f} us")
    print(predicted_line(overhead), flush=True)
    host = {"call": overhead, "F.batch_norm": torch_us, "eval": eval_host_us()}
    host["module"], host["nn.BatchNorm2d"] = module_host_us()
    _write(args.out, card, bw, rows, overhead, torch_us, host)
    return 0


LARGE_BYTES = 64 << 20          # "large shapes" of the targets: inputs of 64 MiB or more
OURS, CUDNN, TORCH_SYNC = "cusyncbn", "torch cuDNN (unsynced)", "torch SyncBN path"
# The targets, per (shape, dtype, layout) unless said otherwise:
FLOOR_TARGET = 0.85             # fraction of the byte floor, forward and backward, on large shapes
CUDNN_TARGET = 1.0              # fwd+bwd speed-up over cuDNN's unsynced batch norm
SYNC_TARGET = 2.0               # fwd+bwd speed-up over PyTorch's synchronized path
HOST_TARGET = 1.0               # host time per call over F.batch_norm's (at most), once per run
EVAL_HOST_TARGET = 0.5          # an eval forward's host time over F.batch_norm's training call
MODULE_HOST_TARGET = 1.3        # cusyncbn.torch module call over torch.nn.BatchNorm2d's
TARGETS = (f"Targets: >= {FLOOR_TARGET:.0%} of the byte floor per pass on large shapes (inputs of "
           f"{LARGE_BYTES >> 20} MiB or more); fwd+bwd >= {CUDNN_TARGET:.1f}x cuDNN's unsynced batch norm and "
           f">= {SYNC_TARGET:.1f}x PyTorch's sync path on every shape; host time per call <= {HOST_TARGET:.1f}x "
           "F.batch_norm's.")


def summary(rows):
    """Per (shape, dtype, layout): cusyncbn's fractions of the byte floor and its speed-up
    over PyTorch's synchronized path and cuDNN (forward + backward), with the targets it
    misses (a missing comparison counts as missed)."""
    by = {}
    for shape, dtype, layout, name, fm, ff, bm, bf, err, ok in rows:
        by.setdefault((shape, dtype, layout), {})[name] = (fm, ff, bm, bf, ok)
    lines = ["| shape | dtype | layout | fwd % floor | bwd % floor | x vs torch SyncBN | x vs cuDNN | targets |",
             "|---|---|---|---|---|---|---|---|"]
    for (shape, dtype, layout), impls in by.items():
        if OURS not in impls:
            continue
        fm, ff, bm, bf, ok = impls[OURS]
        large = math.prod(shape) * (4 if dtype == "float32" else 2) >= LARGE_BYTES
        vs_sync, vs_cudnn = (_speedup(impls.get(other), fm + bm) for other in (TORCH_SYNC, CUDNN))
        misses = [] if ok else ["WRONG"]
        if large and min(ff, bf) < FLOOR_TARGET:
            misses.append(f"< {FLOOR_TARGET:.0%} floor")
        if not vs_cudnn >= CUDNN_TARGET:
            misses.append("slower than cuDNN")
        if not vs_sync >= SYNC_TARGET:
            misses.append(f"< {SYNC_TARGET:g}x sync")
        lines.append(f"| {shape} | {dtype} | {layout} | {ff:.0%} | {bf:.0%} | {vs_sync:.1f} | {vs_cudnn:.2f} | "
                     f"{', '.join(misses) or 'met'} |")
    return lines


def _speedup(other, ours_ms):
    """How many times faster ours (``ours_ms``, forward + backward) is than ``other`` (a row's
    ``(fwd ms, fwd fraction, bwd ms, ...)``; None: not measured, NaN)."""
    return (other[0] + other[2]) / ours_ms if other else float("nan")


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


def _write(out, card, bw, rows, overhead, torch_overhead, host=None):
    os.makedirs(out, exist_ok=True)
    head = (f"Card: {card}; date: {time.strftime('%Y-%m-%d')}; copy bandwidth {bw / 1e12:.2f} TB/s\n\n"
            f"{host_summary(overhead, torch_overhead) if host is None else host_targets(host)}")
    lines = [head, "",
             "| shape | dtype | layout | implementation | fwd ms | fwd % floor | bwd ms | bwd % floor | max err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape, dtype, layout, name, fm, ff, bm, bf, err, ok in rows:
        lines.append(f"| {shape} | {dtype} | {layout} | {name} | {fm:.3f} | {ff:.0%} | {bm:.3f} | {bf:.0%} | "
                     f"{err:.1e}{'' if ok else ' WRONG'} |")
    short = summary(rows)
    lines += ["", "Summary (cusyncbn, fwd+bwd speed-ups):", "", TARGETS, ""] + short
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + head + "\n\n" + TARGETS + "\n" + "\n".join(short))
    _chart(out, rows)


def _chart(out, rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart written", file=sys.stderr)
        return
    keys = list(dict.fromkeys((r[0], r[1], r[2]) for r in rows))
    names = list(dict.fromkeys(r[3] for r in rows))
    value = {((r[0], r[1], r[2]), r[3]): (r[5] + r[7]) / 2 for r in rows}
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
