"""cusyncbn's CUDA kernels, compiled for the CPU and run by an emulator (see ``emu.h``).

CI has no GPU, yet the kernels and the CuPy backend's launch logic (grids, vector
widths, workspace sizes, argument types) are most of the GPU code. ``EmuBackend`` is
the real ``CupyBackend`` with only its CuPy plumbing replaced: arrays are NumPy
arrays and every launch runs the same ``syncbn.cu`` instantiation, compiled by g++
and executed block by block with the block's threads as fibers. Each launch is also
checked for what would fail or corrupt memory on a GPU and go unnoticed on a CPU:

- argument types against the kernel's parameters (pointer element types, int vs
  long long, double), which CuPy passes through unchecked;
- launch limits and misaligned 16-byte vector accesses;
- writes outside an array: every array the backend allocates sits between 64-byte
  guard zones filled with 0xFF (a NaN in every float type), checked after each
  launch; the arrays themselves start filled with NaN, so an element a kernel
  forgets to write, or a read past the end, shows up in the results.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import weakref
from typing import Any

import numpy as np

from cusyncbn import _kernels
from cusyncbn._backend import Backend
from cusyncbn._backend_cupy import CupyBackend
from cusyncbn._backend_numpy import NumpyBackend
from cusyncbn._launch import PackedLaunch

HERE = os.path.dirname(os.path.abspath(__file__))
GUARD = 64                     # bytes on each side of every allocation
POISON = 0xFF


class EmulatedKernelError(RuntimeError):
    pass


def _expressions() -> list[str]:
    seen: dict[str, None] = {}
    for dtype_name in _kernels.CTYPES:
        for expr in _kernels.name_expressions(dtype_name).values():
            seen.setdefault(expr, None)
    return list(seen)


def _translation_unit(source: str, exprs: list[str]) -> str:
    source = source.replace("extern __shared__", "extern").replace("__shared__", "static")
    parts = ['#include "emu.h"', source]
    for i, expr in enumerate(exprs):
        parts.append(f'extern "C" const char* emu_launch_{i}(const unsigned* g, const unsigned* b, size_t shared, '
                     f'void** args) {{ return emu::launch(&{expr}, g, b, shared, args); }}')
        parts.append(f'extern "C" const char* emu_signature_{i}() {{ static const std::string s = '
                     f'emu::signature_of(&{expr}); return s.c_str(); }}')
    return "\n".join(parts) + "\n"


class Library:
    """A CUDA source compiled for the emulator, with the instantiations ``exprs``."""

    def __init__(self, source: str, exprs: list[str]) -> None:
        unit = _translation_unit(source, exprs)
        with open(os.path.join(HERE, "emu.h"), encoding="utf-8") as f:
            key = hashlib.sha256((f.read() + unit).encode()).hexdigest()[:16]
        cache = os.environ.get("CUSYNCBN_EMU_CACHE", os.path.join(tempfile.gettempdir(), "cusyncbn-emu"))
        os.makedirs(cache, exist_ok=True)
        so = os.path.join(cache, f"kernels-{key}.so")
        if not os.path.exists(so):                 # concurrent builders each write their own file
            src = os.path.join(cache, f"kernels-{key}-{os.getpid()}.cpp")
            with open(src, "w", encoding="utf-8") as f:
                f.write(unit)
            tmp = f"{so}.{os.getpid()}.tmp"
            compiler = shutil.which(os.environ.get("CXX", "g++"))
            if compiler is None:
                raise RuntimeError("the kernel emulator needs a C++20 compiler: g++ on the PATH, or $CXX")
            cmd = [compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-U_FORTIFY_SOURCE",
                   "-Wno-unknown-pragmas", "-I", HERE, src, "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            os.remove(src)
            if done.returncode != 0:
                raise RuntimeError(f"emulator build failed:\n{done.stderr[-4000:]}")
            os.replace(tmp, so)
        self._lib = ctypes.CDLL(so)
        self._index = {expr: i for i, expr in enumerate(exprs)}

    def set_block_order(self, seed: int) -> None:
        """0: blocks run in index order; another seed: in a shuffled order, new at each launch."""
        self._lib.emu_set_block_order(ctypes.c_uint(seed))

    def kernel(self, expr: str, after_launch: Any = None) -> "Kernel":
        return Kernel(self._lib, self._index[expr], expr, after_launch)


_library: Library | None = None


def library() -> Library:
    """syncbn.cu with every instantiation the CuPy backend uses (built once, cached on disk)."""
    global _library
    if _library is None:
        _library = Library(_kernels.source(), _expressions())
    return _library


_DTYPE_KIND = {"float64": "d", "float32": "f", "float16": "h", "bfloat16": "b", "int32": "i", "int64": "q", "uint32": "I"}
_SCALAR_KIND = {np.int32: ("i", ctypes.c_int32), np.int64: ("q", ctypes.c_int64), np.float64: ("d", ctypes.c_double)}


class Kernel:
    """One instantiation, called like a ``cupy.RawKernel``: ``k(grid, block, args, shared_mem=0)``."""

    def __init__(self, lib: Any, i: int, expr: str, after_launch: Any = None) -> None:
        self.expr = expr
        self._launch = getattr(lib, f"emu_launch_{i}")
        self._launch.restype = ctypes.c_char_p
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p)]
        sig = getattr(lib, f"emu_signature_{i}")
        sig.restype = ctypes.c_char_p
        self.params = sig().decode().rstrip(",").split(",")
        self._after = after_launch

    def _argument(self, n: int, value: Any, kind: str) -> Any:
        where = f"{self.expr}: argument {n}"
        if kind.startswith("*"):
            if value is None:
                return ctypes.c_void_p(0)
            if not isinstance(value, np.ndarray):
                raise EmulatedKernelError(f"{where} wants a pointer, got {type(value).__name__}")
            if _DTYPE_KIND.get(value.dtype.name) != kind[1]:
                raise EmulatedKernelError(f"{where} points to {kind[1]!r} elements, got a {value.dtype.name} array")
            if not value.flags.c_contiguous:
                raise EmulatedKernelError(f"{where} is not C-contiguous")
            return ctypes.c_void_p(value.ctypes.data)
        entry = _SCALAR_KIND.get(type(value))
        if entry is None or entry[0] != kind:
            raise EmulatedKernelError(f"{where} wants scalar kind {kind!r}, got {type(value).__name__} "
                                      "(CuPy would pass it with the wrong size)")
        return entry[1](value)

    def check_arguments(self, args: tuple) -> list:
        """The ctypes values of ``args``, each checked against its kernel parameter."""
        if len(args) != len(self.params):
            raise EmulatedKernelError(f"{self.expr} takes {len(self.params)} arguments, got {len(args)}")
        return [self._argument(n, a, k) for n, (a, k) in enumerate(zip(args, self.params))]

    def launch_packed(self, grid: tuple, block: tuple, shared_mem: int, params: int) -> None:
        """Launch with arguments already packed (an address of ``void*`` pointers to values,
        as ``cuLaunchKernel`` takes them: what ``cusyncbn._launch.PackedLaunch`` builds)."""
        g = (ctypes.c_uint * 3)(*(tuple(grid) + (1, 1, 1))[:3])
        b = (ctypes.c_uint * 3)(*(tuple(block) + (1, 1, 1))[:3])
        error = self._launch(g, b, shared_mem, ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p)))
        if error:
            raise EmulatedKernelError(f"{self.expr}: {error.decode()}")
        if self._after is not None:
            self._after(self.expr, tuple(grid))

    def __call__(self, grid: Any, block: Any, args: tuple, shared_mem: int = 0) -> None:
        values = self.check_arguments(args)
        argv = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        self.launch_packed(grid, block, shared_mem, ctypes.addressof(argv))


class EmuBackend(CupyBackend):
    """``CupyBackend`` on NumPy arrays with emulated kernels.

    ``sms`` (the multiprocessor count) sets the grid sizes; ``kernels`` replaces
    syncbn.cu by another build of it (a mutated one, in the negative controls);
    ``block_order`` seeds the shuffled order in which blocks run (0: index order);
    ``packed`` launches through ``cusyncbn._launch.PackedLaunch`` (the opt-in fast path).
    """

    import_array = NumpyBackend.import_array
    is_native = NumpyBackend.is_native

    def __init__(self, sms: int = 4, kernels: Library | None = None, block_order: int = 1,
                 packed: bool = False) -> None:
        Backend.__init__(self)
        self._packed = packed
        self._library = kernels or library()
        self._library.set_block_order(block_order)
        self.xp = np
        self.device = "cpu"
        self._index = 0
        self._cuda_device = contextlib.nullcontext()
        self._sms = sms
        self._kernels: dict[tuple[str, str], Any] = {}
        self._guarded: dict[int, tuple[Any, int]] = {}
        self.grids: list[tuple[str, tuple]] = []        # (instantiation, grid) of every launch

    @property
    def launches(self) -> list[str]:
        """The instantiation of every launch, in order."""
        return [expr for expr, _ in self.grids]

    def stream_key(self) -> int:
        return 0

    @staticmethod
    def _address(a: Any) -> int:
        return a.ctypes.data

    def _kernel(self, dtype_name: str, key: str) -> Any:
        kernel = self._kernels.get((dtype_name, key))
        if kernel is None:
            kernel = self._library.kernel(_kernels.name_expressions(dtype_name)[key], self._check_guards)
            if self._packed:                    # the production packing, read back by the emulator
                kernel = _CheckedPackedLaunch(kernel)
            self._kernels[(dtype_name, key)] = kernel
        return kernel

    # -- guarded allocations -------------------------------------------------------------
    def empty(self, shape: Any, dtype: Any) -> Any:
        shape = (shape,) if np.isscalar(shape) else tuple(shape)
        base, arr = _between_guards(shape, np.dtype(dtype))
        self._guarded[id(base)] = (weakref.ref(base), arr.nbytes)
        return arr

    def zeros(self, shape: Any, dtype: Any) -> Any:
        arr = self.empty(shape, dtype)
        arr[...] = 0
        return arr

    def contiguous(self, x: Any) -> Any:
        if x.flags.c_contiguous:
            return x
        out = self.empty(x.shape, x.dtype)
        out[...] = x
        return out

    def _check_guards(self, expr: str, grid: tuple) -> None:
        self.grids.append((expr, grid))
        for key, (ref, nbytes) in list(self._guarded.items()):
            base = ref()
            if base is None:
                del self._guarded[key]
                continue
            if not (np.all(base[:GUARD] == POISON) and np.all(base[GUARD + nbytes:] == POISON)):
                raise EmulatedKernelError(f"{expr} wrote outside a {nbytes}-byte allocation")


class _CheckedPackedLaunch(PackedLaunch):
    """``cusyncbn._launch.PackedLaunch`` into the emulator, arguments checked first."""

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel.launch_packed, EmuBackend._address)
        self._kernel = kernel

    def __call__(self, grid: Any, block: Any, args: tuple, shared_mem: int = 0) -> None:
        self._kernel.check_arguments(args)
        super().__call__(grid, block, args, shared_mem)


def _between_guards(shape: tuple, dtype: Any, shift: int = 0) -> tuple[Any, Any]:
    """(base, array): an array of ``shape`` inside a poisoned byte buffer, GUARD bytes of
    poison on each side (``shift`` more before it, to misalign it)."""
    nbytes = math.prod(shape) * dtype.itemsize
    base = np.full(nbytes + 2 * GUARD + shift, POISON, dtype=np.uint8)
    return base, base[GUARD + shift:GUARD + shift + nbytes].view(dtype).reshape(shape)


def guarded_copy(x: Any, misalign: bool = False) -> Any:
    """``x`` copied between guard zones, 16-byte aligned or (``misalign``) one element off."""
    x = np.asarray(x)
    _, out = _between_guards(x.shape, x.dtype, x.dtype.itemsize if misalign else 0)
    out[...] = x
    return out
