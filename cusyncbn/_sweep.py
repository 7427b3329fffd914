"""Autotuning of the kernels' launch configurations: measure, keep the best, ship the table.

On a GPU, ``run_sweep()`` takes every benchmark shape, dtype and layout, and for each pass
(moments, normalize, backward, dx) each configuration of ``sweep_grid`` in turn: it first
checks a full training forward+backward launched that way against the float64 reference,
then times the pass alone with CUDA events (median), and writes the fastest configuration
per pass into a tuning table under this GPU's key (compute capability and SM count): the
shipped table ``_kernels/tuning.json`` with this GPU's entries added, written to an output
folder (``sweep_out/tuning.json`` by default). Committed as ``_kernels/tuning.json``, it is
the table ``CupyBackend`` consults before its heuristic.

    python -m cusyncbn.bench --sweep --out sweep_out

The same code runs on the CPU with the kernel emulator and a stand-in timer (the tests
check every configuration of the grid for correctness that way).
"""
from __future__ import annotations

import copy
import itertools
import os
from functools import partial
from typing import Any, Callable, Iterable

import numpy as np

from . import _kernels, _reference, _tuning
from ._tuning import LaunchConfig

TOL = {"float16": 3e-2, "bfloat16": 1e-1, "float32": 1e-4, "float64": 1e-9}


def sweep_grid(layout: str) -> list[LaunchConfig]:
    """The configurations tried per pass: block size, channel-last lanes, waves of blocks,
    vector width cap (0: the widest, 4: at most 4 elements) and loads in flight."""
    threads = (128, 256, 512) if layout == "cs" else (256, 512)
    lanes = (0,) if layout == "cs" else (0, 16)
    return [LaunchConfig(threads=t, lanes=l, waves=w, vec=v, loads=n)
            for t, l, w, v, n in itertools.product(threads, lanes, (1.0, 2.0), (0, 4), (2, 4))]


def reference(bn: Any, x: Any, dy: Any, to_host: Callable[[Any], Any], data_format: str) -> tuple:
    """``(y_ref, dx_ref, tol)`` of one training step of a fresh ``bn`` on ``x`` / ``dy``: the
    float64 reference (``cusyncbn._reference``), computed once per case on the host and kept
    on ``x``'s device as float32 (checking a configuration is then a few device reductions,
    not a host pass over the whole input)."""
    from ._backend import dtype_name
    from ._backend_factory import get_backend
    xh, dyh = to_host(x), to_host(dy)
    w, b = to_host(bn.weight.data), to_host(bn.bias.data)
    y_ref = _reference.forward(xh, w, b, bn.epsilon, data_format)[0]
    dx_ref = _reference.backward(xh, dyh, w, bn.epsilon, data_format)[0]
    backend = get_backend(bn.device)
    with backend.scope():
        return (backend.xp.asarray(y_ref, dtype=np.float32), backend.xp.asarray(dx_ref, dtype=np.float32),
                TOL[dtype_name(x.dtype)])


def layer_error(bn: Any, x: Any, dy: Any, ref: tuple) -> float:
    """Largest error of y and dx of one training step of ``bn`` against ``ref`` (from
    :func:`reference`), relative to the tolerance of ``x``'s dtype (<= 1: correct)."""
    from ._backend_factory import get_backend
    y_ref, dx_ref, tol = ref
    xp = get_backend(bn.device).xp
    y = bn(x)
    dx = bn.backward(dy)
    errors = [xp.max(xp.abs(got.astype(np.float32) - want) / (tol * (1 + xp.abs(want))))
              for got, want in ((y, y_ref), (dx, dx_ref)) if want.size]
    return max((float(e) for e in errors), default=0.0)


def _pass_call(backend: Any, kind: str, bn: Any, x: Any, dy: Any) -> Callable[[], None]:
    """A call of pass ``kind`` alone, with the state a training step leaves (for timing)."""
    from ._backend import BackwardPayload, ForwardPayload, Stats
    from ._rules import channel_last, view3
    last = channel_last(bn.data_format)
    c = bn.num_features
    x3, dy3 = view3(x, c, last), view3(dy, c, last)
    stats = Stats(backend.empty((Stats.size(c),), np.float64 if x.dtype == np.float64 else np.float32),
                  backend.zeros((ForwardPayload.size(c),), np.float64), c)
    rm = bn.running_mean
    pivot_state = backend.zeros((c,), np.float64)
    y3 = backend.empty(x3.shape, x3.dtype)
    bbuf = backend.zeros((BackwardPayload.size(c),), np.float64)
    dx3 = backend.empty(x3.shape, x3.dtype)

    def moments() -> None:
        backend.local_moments(x3=x3, pivot_state=pivot_state, tag=0, buf=stats.payload)

    def normalize() -> None:
        backend.normalize_batch(x3=x3, buf=stats.payload, tag=0, ranks=1, running_mean=rm, running_var=None,
                                momentum=0.9, eps=1e-5, unbiased=False, weight=None, bias=None, stats=stats,
                                y3=y3)

    def backward() -> None:
        backend.backward_reduce(dy3=dy3, x3=x3, stats=stats, weight_grad=None, bias_grad=None, tag=0, buf=bbuf)

    def dx() -> None:
        backend.backward_input(dy3=dy3, x3=x3, stats=stats, buf=bbuf, count=stats.slots.count, tag=0, ranks=1,
                               dx3=dx3)

    moments()
    normalize()
    return {"moments": moments, "normalize": normalize, "backward": backward, "dx": dx}[kind]


def sweep_case(backend: Any, shape: tuple, dtype_name: str, data_format: str, make: Callable[..., Any],
               to_host: Callable[[Any], Any], timer: Callable[[Callable[[], None]], float],
               grid: Iterable[LaunchConfig] | None = None, kinds: Iterable[str] = _kernels.PASSES,
               log: Callable[[str], None] = lambda line: None) -> dict[str, dict]:
    """Best configuration per pass for one (shape, dtype, layout): ``{shape_key: config dict}``.

    ``make(shape, dtype_name, seed)`` builds an input on ``backend``'s device. Every
    configuration is checked (a full training step launched with it, against the float64
    reference) before it is timed; wrong ones are reported through ``log`` and skipped."""
    import cusyncbn
    from ._backend import dtype_name as name_of
    channel_last = data_format.endswith("C")
    c = shape[-1] if channel_last else shape[1]
    x, dy = make(shape, dtype_name, 0), make(shape, dtype_name, 1)
    pdtype = "float64" if dtype_name == "float64" else "float32"

    def layer() -> Any:
        return cusyncbn.SyncBatchNorm(c, data_format=data_format, dtype=pdtype, device=backend.device,
                                      comm=cusyncbn.SingleProcessComm())

    from ._rules import shape3
    x3_shape = shape3(tuple(x.shape), c, channel_last)
    layout = _tuning.layout_for(x3_shape, name_of(x.dtype))
    ref = reference(layer(), x, dy, to_host, data_format)
    best: dict[str, dict] = {}
    for kind in kinds:
        results = []
        for config in (sweep_grid(layout) if grid is None else grid):
            backend.set_launch_config(kind, layout, config)
            bn = layer()
            error = layer_error(bn, x, dy, ref)
            if not error <= 1:
                log(f"{kind} {shape} {dtype_name} {data_format} {config}: WRONG (error {error:.2f} x tolerance)")
                continue
            ms = timer(_pass_call(backend, kind, bn, x, dy))
            results.append((ms, config))
            log(f"{kind} {shape} {dtype_name} {data_format} {config}: {ms:.4f} ms")
        backend.set_launch_config(kind, layout, None)
        if results:
            best[_tuning.shape_key(kind, layout, name_of(x.dtype), x3_shape)] = min(results, key=lambda r: r[0])[1].as_dict()
    return best


def run_sweep(shapes: Iterable[tuple] | None = None, dtypes: Iterable[str] | None = None,
              layouts: Iterable[str] | None = None, reps: int = 20, out: str = "sweep_out",
              device: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Measure the best configuration of every pass for every benchmark case on this GPU and
    write the table to ``<out>/tuning.json``: the table there (from an earlier run), else the
    shipped one, with this GPU's entries added. Returns the table. Nothing is written into the
    installed package: commit the file as ``cusyncbn/_kernels/tuning.json`` to ship it.

    Args:
        shapes, dtypes, layouts: the cases; default the benchmark's (``_bench_cases``) SHAPES, DTYPES, LAYOUTS.
        reps: timed runs per configuration (median).
        out: the output folder (made if missing), relative to the current directory.
        device: the CUDA device (default: the current one).
    """
    import cupy

    from ._backend_factory import get_backend
    from ._bench_cases import DTYPES, LAYOUTS, SHAPES, cuda_ms
    index = cupy.cuda.Device().id if device is None else device
    backend = get_backend(f"gpu:{index}")
    timer = partial(cuda_ms, reps=reps, warmup=1)

    def make(shape: tuple, dtype_name: str, seed: int) -> Any:
        with cupy.cuda.Device(index):
            x = cupy.random.default_rng(seed).standard_normal(shape, dtype=cupy.float32) * 2 + 3
            if dtype_name == "bfloat16":                 # CuPy makes no bfloat16: torch does
                import torch
                return cupy.from_dlpack(torch.from_dlpack(x).to(torch.bfloat16))
            return x.astype(dtype_name)

    def to_host(a: Any) -> Any:
        return cupy.asnumpy(a.astype(cupy.float64))

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "tuning.json")
    table = copy.deepcopy(_tuning.load_table(path if os.path.exists(path) else _tuning.TABLE_PATH))
    entries = table.setdefault(backend.arch, {})
    for shape in shapes or SHAPES:
        for dtype_name in dtypes or DTYPES:
            for data_format in layouts or LAYOUTS:
                full = shape if data_format == "NCHW" else (shape[0],) + tuple(shape[2:]) + (shape[1],)
                entries.update(sweep_case(backend, full, dtype_name, data_format, make, to_host, timer, log=log))
                _tuning.save_table(table, path)
    log(f"wrote {len(entries)} entries for {backend.arch} to {path}")
    return table
