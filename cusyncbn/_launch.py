"""Kernel arguments packed once, in the layout ``cuLaunchKernel`` takes them.

``cuLaunchKernel(f, grid, block, shared, stream, kernelParams, extra)`` reads its
arguments through ``kernelParams``, an array of pointers, one per kernel parameter, each
pointing at the bytes of that parameter; the driver copies them when the launch is
queued, so one buffer can serve every launch of a plan (on one thread). CuPy's
``RawKernel.__call__`` instead builds a new wrapper object per argument on every call
(about 1 us each on the H200, docs/PERFORMANCE.md).

:class:`Arguments` holds one 8-byte cell per parameter (pointers, ``unsigned long long``
and ``double`` fill it; an ``int`` its low 4 bytes, the platforms CUDA runs on being
little-endian) and the pointer array. Cells are written by name (the parameter names of
``_kernels.PARAMS``, the ones ``syncbn.cu`` declares), once for what a plan fixes and per
call for the data pointers and the collective tag.

What goes into each kernel's parameters is said in one place per kernel, the builders
below (:func:`moments_arguments`, :func:`normalize_arguments`, :func:`backward_arguments`,
:func:`dx_arguments`): keyword-only, every parameter a call gives (a pack keeps what it was
last given, so a parameter left out would silently keep another launch's value); the plan
gives the rest (A, C, B and the workspaces, ``_backend_cupy._WORK``). The CuPy backend's
steps and the planned path (``_planned``) both build their arguments with them; the planned
path then rewrites only the data pointers, the tag and the report slot per call. Pointers
are arrays, device addresses (ints) or None (nullptr).
"""
from __future__ import annotations

import ctypes
from typing import Any

POINTER_KINDS = ("T*", "P*", "S*", "d*", "I*", "Q*")


class Arguments:
    """The parameters of one kernel, packed for ``cuLaunchKernel``.

    Args:
        params: ``((name, kind), ...)`` in the kernel's order (``_kernels.PARAMS[kind]``).

    Attributes:
        address: the ``kernelParams`` pointer (an int) to pass to the driver.
        cells: the 8-byte cells (``ctypes`` array of ``c_uint64``) holding pointers and
            ``unsigned long long`` values; :attr:`doubles` views the same cells as doubles.
    """

    __slots__ = ("names", "kinds", "index", "cells", "doubles", "_ints", "_argv", "address")

    def __init__(self, params: tuple) -> None:
        n = len(params)
        self.names = tuple(name for name, _ in params)
        self.kinds = tuple(kind for _, kind in params)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.cells = (ctypes.c_uint64 * max(n, 1))()
        base = ctypes.addressof(self.cells)
        self.doubles = (ctypes.c_double * max(n, 1)).from_address(base)
        self._ints = (ctypes.c_int32 * (2 * max(n, 1))).from_address(base)
        self._argv = (ctypes.c_void_p * max(n, 1))(*(base + 8 * i for i in range(n)))
        self.address = ctypes.addressof(self._argv)

    def set(self, name: str, value: Any) -> None:
        """Write parameter ``name``: a device address (int; None for nullptr) for pointer
        kinds, a float for ``d``, an int for ``i`` / ``Q``.

        Raises:
            KeyError: the kernel has no parameter ``name``.
        """
        i = self.index[name]
        kind = self.kinds[i]
        if kind == "d":
            self.doubles[i] = float(value)
        elif kind == "i":
            self.cells[i] = 0
            self._ints[2 * i] = int(value)
        else:
            self.cells[i] = 0 if value is None else int(value)

    def update(self, values: dict) -> None:
        for name, value in values.items():
            self.set(name, value)

    def value(self, name: str) -> Any:
        """The value in parameter ``name``'s cell, as its kind reads it."""
        i = self.index[name]
        kind = self.kinds[i]
        return self.doubles[i] if kind == "d" else self._ints[2 * i] if kind == "i" else self.cells[i]

    def __repr__(self) -> str:
        return "Arguments(" + ", ".join(f"{n}={self.value(n)!r}" for n in self.names) + ")"


# -- each kernel's arguments, built in one place ---------------------------------------------------

def moments_arguments(*, x: Any, pivot_state: Any, pivot_payload: Any, tag: float, buf: Any) -> dict:
    """The moments kernel's call arguments (``Backend.local_moments``)."""
    return {"x": x, "pivot_state": pivot_state, "pivot_payload": pivot_payload, "tag": tag, "buf": buf}


def normalize_arguments(*, x: Any, y: Any, stats: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any,
                        eps: float, residual: Any, relu: bool, buf: Any = None, tag: float = 0, ranks: float = 1,
                        momentum: float = 0.0, unbiased: bool = False, report: Any = None, seq: int = 0,
                        pivot_state_out: Any = None, strict: bool = False) -> dict:
    """The normalize kernel's call arguments (``Backend.normalize_batch``; with ``buf`` None,
    ``normalize_fixed``: the statistics are the running ones and the batch arguments after
    ``buf`` keep these values). ``residual`` (None: none) and ``relu``: the epilogue."""
    return {"x": x, "y": y, "buf": buf, "tag": tag, "ranks": ranks, "running_mean": running_mean,
            "running_var": running_var, "momentum": momentum, "eps": eps, "unbiased": int(bool(unbiased)),
            "weight": weight, "bias": bias, "stats": stats, "report": report, "seq": seq,
            "pivot_state_out": pivot_state_out, "strict": int(bool(strict)), "residual": residual,
            "relu": int(bool(relu))}


def backward_arguments(*, dy: Any, x: Any, stats: Any, tag: float, weight_grad: Any, bias_grad: Any,
                       buf: Any, y: Any) -> dict:
    """The backward kernel's call arguments (``Backend.backward_reduce``; ``y``: the forward's
    output under ReLU, None without)."""
    return {"dy": dy, "x": x, "stats": stats, "tag": tag, "weight_grad": weight_grad, "bias_grad": bias_grad,
            "buf": buf, "y": y}


def dx_arguments(*, dy: Any, x: Any, dx: Any, stats: Any, ranks: float, y: Any, dresidual: Any, buf: Any = None,
                 count: Any = None, tag: float = 0, report: Any = None, seq: int = 0) -> dict:
    """The dx kernel's call arguments (``Backend.backward_input``; ``buf`` None: fixed (eval)
    statistics, and ``count``, ``tag``, ``report`` and ``seq`` keep these values). ``y``: the
    forward's output under ReLU (None without); ``dresidual``: where the residual's gradient
    goes (None: not wanted); ``dx`` None: only ``dresidual`` (with ``buf`` None)."""
    return {"dy": dy, "x": x, "dx": dx, "stats": stats, "buf": buf, "count": count, "tag": tag, "ranks": ranks,
            "report": report, "seq": seq, "y": y, "dresidual": dresidual}


#: The builder of each kernel's call arguments, by pass (``_kernels.PASSES``).
BUILDERS = {"moments": moments_arguments, "normalize": normalize_arguments, "backward": backward_arguments,
            "dx": dx_arguments}
