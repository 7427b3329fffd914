"""Kernel launches with prepacked arguments (opt-in: ``CUSYNCBN_PACKED_LAUNCH=1``).

``cupy.RawKernel.__call__`` turns every argument into a Python object before calling
``cuLaunchKernel`` (about 6 us of host time per launch on an H100 host, 3 to 4 launches
per layer call). ``PackedLaunch`` writes the arguments into reused 8-byte slots and
hands ``cuLaunchKernel`` an array of pointers to them: the layout the driver expects
(``kernelParams[i]`` points at the value of parameter ``i``, which the kernel reads
with its own size). Every argument of the kernels in ``_kernels/syncbn.cu`` is a
pointer, ``int``, ``long long``, ``unsigned`` or ``double``: at most 8 bytes, and a
slot's first bytes hold the value (little-endian).

The packing is exercised on the CPU by the kernel emulator (tests/cuda_emu), which
reads its arguments through the same array of pointers. Whether it is faster than
CuPy's own launch, and so whether it becomes the default, is for the benchmark to say
on a GPU.
"""
from __future__ import annotations

import ctypes
import struct
import threading
from typing import Any, Callable

import numpy as np

MAX_ARGS = 16
# Slot layout per argument type (little-endian, 8 bytes each); anything else is an array.
_SLOT = {np.int32: "i4x", np.uint32: "I4x", np.int64: "q", np.float64: "d", type(None): "Q"}
_REJECT = (int, float, bool, np.float32, np.int16, np.int8, np.uint64)


class _Slots(threading.local):
    """Per-thread argument slots and the pointer array the driver reads."""

    def __init__(self) -> None:
        self.u64 = (ctypes.c_uint64 * MAX_ARGS)()
        base = ctypes.addressof(self.u64)
        self.params = (ctypes.c_void_p * MAX_ARGS)(*[base + 8 * i for i in range(MAX_ARGS)])
        self.params_address = ctypes.addressof(self.params)


_slots = _Slots()
_layouts: dict[tuple, struct.Struct] = {}


def _layout(types: tuple) -> struct.Struct:
    if len(types) > MAX_ARGS:
        raise ValueError(f"a kernel launch takes at most {MAX_ARGS} arguments, got {len(types)}")
    for i, kind in enumerate(types):
        if kind in _REJECT:
            raise TypeError(f"kernel argument {i}: pass np.int32 / np.int64 / np.uint32 / np.float64 "
                            f"scalars (the kernel's width), not {kind.__name__}")
    layout = _layouts[types] = struct.Struct("<" + "".join(_SLOT.get(kind, "Q") for kind in types))
    return layout


def pack(args: tuple, address: Callable[[Any], int]) -> int:
    """Write ``args`` into this thread's slots; returns the address of the pointer array.

    Arrays become their device address (``address(array)``), ``None`` a null pointer,
    NumPy scalars their value in the kernel parameter's width.
    """
    types = tuple(map(type, args))
    layout = _layouts.get(types) or _layout(types)
    slots = _slots
    layout.pack_into(slots.u64, 0, *[0 if a is None else (a if t in _SLOT else address(a))
                                     for a, t in zip(args, types)])
    return slots.params_address


class PackedLaunch:
    """Callable like a ``cupy.RawKernel``: ``k(grid, block, args, shared_mem=0)``.

    Args:
        launch: ``launch(grid3, block3, shared_mem, params_address)`` performs the launch
            (``cuLaunchKernel`` on the current stream, or the emulator's entry point).
        address: device address of an array argument.
    """

    def __init__(self, launch: Callable[[tuple, tuple, int, int], None], address: Callable[[Any], int]) -> None:
        self._launch = launch
        self._address = address

    def __call__(self, grid: Any, block: Any, args: tuple, shared_mem: int = 0) -> None:
        params = pack(args, self._address)
        self._launch((tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3], shared_mem, params)


def cupy_launcher(raw_kernel: Any, device_index: int) -> PackedLaunch:
    """A ``PackedLaunch`` of a ``cupy.RawKernel`` through ``cuLaunchKernel`` on the current stream."""
    import cupy
    from cupy.cuda import driver
    function = raw_kernel.kernel.ptr                     # compiles and loads it once, here

    def launch(grid: tuple, block: tuple, shared_mem: int, params: int) -> None:
        stream = cupy.cuda.get_current_stream(device_index).ptr
        driver.launchKernel(function, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_mem,
                            stream, params, 0)

    return PackedLaunch(launch, lambda a: a.data.ptr)
