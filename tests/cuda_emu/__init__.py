"""cusyncbn's CUDA kernels, compiled for the CPU and run by an emulator (see ``emu.h``).

CI has no GPU, yet the kernels and the CuPy backend's launch logic (grids, vector
widths, workspace sizes, argument types) are most of the GPU code. ``EmuBackend`` is
the real ``CupyBackend`` with only its CuPy plumbing replaced: arrays are NumPy
arrays and every launch runs the same ``syncbn.cu`` instantiation, compiled by g++
and executed block by block with the block's threads as fibers. Each launch is also
checked for what would fail or corrupt memory on a GPU and go unnoticed on a CPU:

- argument types against the kernel's parameters (pointer element types, int vs
  long long, double), which CuPy passes through unchecked; and, for packed launches, the
  argument names (``_kernels.PARAMS``) against the parameter names ``syncbn.cu`` declares,
  in order, so that two parameters of one type swapped (momentum and eps) do not pass;
- launch limits and misaligned 16-byte vector accesses;
- writes outside an array: every array the backend allocates sits between 64-byte
  guard zones filled with 0xFF (a NaN in every float type), checked after each
  launch; the arrays themselves start filled with NaN, so an element a kernel
  forgets to write, or a read past the end, shows up in the results.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import weakref
from typing import Any

import numpy as np

from cusyncbn import _kernels
from stub_backend import StubBackend

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


def _defines(options: tuple) -> list[str]:
    """``-DNAME=VALUE`` options as ``#define`` lines."""
    return [f"#define {o[2:].replace('=', ' ', 1)}" for o in options if o.startswith("-D")]


def parameter_names(source: str) -> dict[str, tuple[str, ...]]:
    """Every ``__global__`` function of ``source`` -> its parameter names in order, as declared
    (through the ``#define *_PARAMS`` macro standing for its list, where one does)."""
    text = source.replace("\\\n", " ")                    # macro continuation lines joined
    macros = dict(re.findall(r"^[ \t]*#define[ \t]+(\w+)[ \t]+(.*)$", text, re.M))
    names: dict[str, tuple[str, ...]] = {}
    for kernel, params in re.findall(r"__global__\s+void\s+(?:\w+\s+)*?(\w+)\s*\(([^)]*)\)", text):
        params = macros.get(params.strip(), params)
        names[kernel] = tuple(re.findall(r"\w+", p)[-1] for p in params.split(",") if p.strip())
    return names


def _translation_unit(source: str, exprs: list[str], options: tuple = ()) -> str:
    source = source.replace("extern __shared__", "extern").replace("__shared__", "static")
    parts = ['#include "emu.h"', *_defines(options), source]
    for i, expr in enumerate(exprs):
        parts.append(f'extern "C" const char* emu_launch_{i}(const unsigned* g, const unsigned* b, size_t shared, '
                     f'void** args) {{ return emu::launch(&{expr}, g, b, shared, args); }}')
        parts.append(f'extern "C" const char* emu_signature_{i}() {{ static const std::string s = '
                     f'emu::signature_of(&{expr}); return s.c_str(); }}')
    return "\n".join(parts) + "\n"


class Library:
    """A CUDA source compiled for the emulator, with the instantiations ``exprs`` and the
    ``-D`` settings among ``options`` (as NVRTC gets them)."""

    def __init__(self, source: str, exprs: list[str], options: tuple = ()) -> None:
        unit = _translation_unit(source, exprs, options)
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
        self._names = parameter_names(source)

    def set_block_order(self, seed: int) -> None:
        """0: blocks run in index order; another seed: in a shuffled order, new at each launch."""
        self._lib.emu_set_block_order(ctypes.c_uint(seed))

    def kernel(self, expr: str, after_launch: Any = None) -> "Kernel":
        return Kernel(self._lib, self._index[expr], expr, after_launch, self._names.get(expr.split("<")[0].strip()))


_libraries: dict[int, Library] = {}


def library(loads: int = _kernels.LOADS) -> Library:
    """syncbn.cu with every instantiation the CuPy backend uses, compiled with the settings of
    ``_kernels.options(loads)`` (built once, cached on disk)."""
    lib = _libraries.get(loads)
    if lib is None:
        lib = _libraries[loads] = Library(_kernels.source(), _expressions(), _kernels.options(loads))
    return lib


def mutated(good: str, bad: str) -> Library:
    """syncbn.cu with its one occurrence of ``good`` replaced by ``bad`` (a deliberate bug, for
    the negative controls), compiled as :func:`library` compiles it."""
    source = _kernels.source()
    if source.count(good) != 1:
        raise ValueError(f"{good!r} occurs {source.count(good)} times in syncbn.cu, not once")
    return Library(source.replace(good, bad), _expressions(), _kernels.options())


_DTYPE_KIND = {"float64": "d", "float32": "f", "float16": "h", "bfloat16": "b", "int32": "i", "int64": "q", "uint32": "I",
               "uint64": "Q"}
_SCALAR_KIND = {np.int32: ("i", ctypes.c_int32), np.int64: ("q", ctypes.c_int64), np.float64: ("d", ctypes.c_double),
                np.uint64: ("Q", ctypes.c_uint64)}


class Kernel:
    """One instantiation, called like a ``cupy.RawKernel``: ``k(grid, block, args, shared_mem=0)``."""

    def __init__(self, lib: Any, i: int, expr: str, after_launch: Any = None, names: tuple | None = None) -> None:
        self.expr = expr
        self.names = names                 # the parameter names the source declares (None: unknown)
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

    def check_names(self, names: tuple) -> None:
        """Argument names in launch order (``_kernels.PARAMS``) against the parameter names the
        source declares: a value written under one name must reach the parameter of that name."""
        if self.names is None:
            return
        if len(names) != len(self.names):
            raise EmulatedKernelError(f"{self.expr} declares {len(self.names)} parameters {self.names}, the "
                                      f"arguments name {len(names)}")
        for n, (given, declared) in enumerate(zip(names, self.names)):
            if given != declared:
                raise EmulatedKernelError(f"{self.expr}: argument {n} is {given!r}, the kernel's parameter {n} is "
                                          f"{declared!r} (_kernels.PARAMS and syncbn.cu disagree)")

    def check_packed(self, names: tuple, kinds: tuple, dtypes: dict) -> None:
        """A pre-packed argument list (``_launch.Arguments``: parameter names and kinds of
        ``_kernels.PARAMS``) against this kernel's parameters, names and types; ``dtypes`` maps
        the kinds' type letters (T, P, S) to NumPy dtype names."""
        if len(kinds) != len(self.params):
            raise EmulatedKernelError(f"{self.expr} takes {len(self.params)} arguments, the pack has {len(kinds)}")
        self.check_names(names)
        letters = {"d": "float64", "I": "uint32", "Q": "uint64", **dtypes}
        for n, (name, kind, param) in enumerate(zip(names, kinds, self.params)):
            want = ("*" + _DTYPE_KIND[letters[kind[0]]]) if kind.endswith("*") else kind
            if want != param:
                raise EmulatedKernelError(f"{self.expr}: argument {n} ({name}) is packed as {kind} ({want}), "
                                          f"the kernel takes {param}")

    def launch_packed(self, grid: Any, block: Any, shared_mem: int, args: Any) -> None:
        """Launch with a pre-packed argument list, as cuLaunchKernel would read it."""
        g = (ctypes.c_uint * 3)(*(tuple(grid) + (1, 1, 1))[:3])
        b = (ctypes.c_uint * 3)(*(tuple(block) + (1, 1, 1))[:3])
        error = self._launch(g, b, shared_mem, ctypes.cast(args.address, ctypes.POINTER(ctypes.c_void_p)))
        if error:
            raise EmulatedKernelError(f"{self.expr}: {error.decode()}")
        if self._after is not None:
            self._after(self.expr, tuple(grid))

    def __call__(self, grid: Any, block: Any, args: tuple, shared_mem: int = 0) -> None:
        values = self.check_arguments(args)
        argv = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        g = (ctypes.c_uint * 3)(*(tuple(grid) + (1, 1, 1))[:3])
        b = (ctypes.c_uint * 3)(*(tuple(block) + (1, 1, 1))[:3])
        error = self._launch(g, b, shared_mem, ctypes.cast(argv, ctypes.POINTER(ctypes.c_void_p)))
        if error:
            raise EmulatedKernelError(f"{self.expr}: {error.decode()}")
        if self._after is not None:
            self._after(self.expr, tuple(grid))


class DeviceArray(np.ndarray):
    """The emulated backend's arrays: NumPy arrays whose in-place host writes (``fill``, item
    assignment) are recorded as launches, as each is a kernel launch on a GPU."""

    recorder: Any = None

    def fill(self, value: Any) -> None:
        _record_host_write("fill", self.shape)
        super().fill(value)

    def __setitem__(self, key: Any, value: Any) -> None:
        _record_host_write("setitem", self.shape)
        super().__setitem__(key, value)


def _record_host_write(what: str, shape: tuple) -> None:
    backend = DeviceArray.recorder() if DeviceArray.recorder is not None else None
    if backend is not None:
        backend.grids.append((f"<host {what}>", shape))


class EmuBackend(StubBackend):
    """``CupyBackend`` on NumPy arrays with emulated kernels (``tests/stub_backend.py``'s
    stand-in with the kernels run).

    ``sms`` (the multiprocessor count) sets the grid sizes; ``kernels`` replaces
    syncbn.cu by another build of it (a mutated one, in the negative controls);
    ``block_order`` seeds the shuffled order in which blocks run (0: index order).
    Kernels count as using ``registers`` per thread (the launch bounds' cap), so grids are
    those of the least occupancy the kernels may have.
    """

    registers = 64
    array_types = (np.ndarray, DeviceArray)

    def __init__(self, sms: int = 4, kernels: Library | None = None, block_order: int = 1) -> None:
        super().__init__(sms)
        self.table = None                                # the shipped table, as on a GPU
        self._library = kernels
        self._block_order = block_order
        (kernels or library()).set_block_order(block_order)
        self.arch = "emu"
        self._guarded: dict[int, tuple[Any, int]] = {}
        self.grids: list[tuple[str, tuple]] = []        # (instantiation, grid) of every launch
        DeviceArray.recorder = weakref.ref(self)

    @property
    def launches(self) -> list[str]:
        """The instantiation of every launch, in order."""
        return [expr for expr, _ in self.grids]

    def _resources(self, kernel: Any) -> tuple[int, int]:
        return self.registers, 64

    def _kernel(self, dtype_name: str, key: str, loads: int) -> Any:
        kernel = self._kernels.get((dtype_name, key, loads))
        if kernel is None:
            lib = self._library or library(loads)
            if lib is not (self._library or library()):
                lib.set_block_order(self._block_order)
            kernel = lib.kernel(_kernels.name_expressions(dtype_name)[key], self._check_guards)
            self._kernels[(dtype_name, key, loads)] = kernel
        return kernel

    def _run(self, plan: Any, values: dict) -> None:
        if self.launch_mode == "call":      # (packed launches are checked by packed_launcher)
            plan.kernel.check_names(tuple(name for name, _ in _kernels.PARAMS[plan.kind]))
        super()._run(plan, values)

    def packed_launcher(self, plan: Any, args: Any, stream: int) -> Any:
        kernel = plan.kernel
        expr = kernel.expr
        t = next(name for name, c in _kernels.CTYPES.items() if expr.split("<")[1].split(",")[0].strip(" >") == c)
        p = "float64" if ", double," in expr else "float32"
        kernel.check_packed(args.names, args.kinds, {"T": t, "P": p, "S": "float64" if t == "float64" else "float32"})
        return functools.partial(kernel.launch_packed, plan.grid, plan.block, plan.shared, args)

    def _raw_pointer(self, address: int) -> Any:
        """A raw slot address (the report ring) as the emulator's pointer argument: the slot."""
        ring = self.report_ring()
        if address == 0:
            return None
        index = (address - ring.address) // 8
        return ring.host[index:index + 1]

    # -- guarded allocations -------------------------------------------------------------
    def empty(self, shape: Any, dtype: Any) -> Any:
        shape = (shape,) if np.isscalar(shape) else tuple(shape)
        base, arr = _between_guards(shape, np.dtype(dtype))
        self._guarded[id(base)] = (weakref.ref(base), arr.nbytes)
        return arr

    def zeros(self, shape: Any, dtype: Any) -> Any:
        arr = self.empty(shape, dtype)
        np.ndarray.fill(arr, 0)                    # a fresh allocation: cupy.zeros, not a launch on x
        return arr

    def contiguous(self, x: Any) -> Any:
        if x.flags.c_contiguous:
            return x
        out = self.empty(x.shape, x.dtype)
        np.copyto(out, x)
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


def _between_guards(shape: tuple, dtype: Any, shift: int = 0) -> tuple[Any, Any]:
    """(base, array): an array of ``shape`` inside a poisoned byte buffer, GUARD bytes of
    poison on each side (``shift`` more before it, to misalign it)."""
    nbytes = math.prod(shape) * dtype.itemsize
    base = np.full(nbytes + 2 * GUARD + shift, POISON, dtype=np.uint8)
    return base, base[GUARD + shift:GUARD + shift + nbytes].view(dtype).reshape(shape).view(DeviceArray)


def guarded_copy(x: Any, misalign: bool = False) -> Any:
    """``x`` copied between guard zones, 16-byte aligned or (``misalign``) one element off."""
    x = np.asarray(x)
    _, out = _between_guards(x.shape, x.dtype, x.dtype.itemsize if misalign else 0)
    np.copyto(out, x)
    return out
