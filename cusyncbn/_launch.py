"""Kernel arguments packed once, in the layout ``cuLaunchKernel`` takes them.

``cuLaunchKernel(f, grid, block, shared, stream, kernelParams, extra)`` reads its
arguments through ``kernelParams``, an array of pointers, one per kernel parameter, each
pointing at the bytes of that parameter; the driver copies them when the launch is
queued, so one buffer can serve every launch of a plan (on one thread). CuPy's
``RawKernel.__call__`` instead builds a new wrapper object per argument on every call
(about 1 us each on the H200, ``../perf/h200-2026-11-29.md``).

:class:`Arguments` holds one 8-byte cell per parameter (pointers, ``unsigned long long``
and ``double`` fill it; an ``int`` its low 4 bytes, the platforms CUDA runs on being
little-endian) and the pointer array. Cells are written by name (the parameter names of
``_kernels.PARAMS``, the ones ``syncbn.cu`` declares), once for what a plan fixes and per
call for the data pointers and the collective tag.
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
