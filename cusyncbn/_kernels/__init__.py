"""The CUDA source, its compile-time settings and the list of its template instantiations.

Shared by the CuPy backend (which compiles one module per input dtype and settings,
lazily, with ``cupy.RawModule``), by the CI tests that compile every instantiation with
NVRTC on a machine without a GPU (and read its resources from the CUBIN), and by the
kernel emulator in ``tests/cuda_emu``.
"""
from __future__ import annotations

import os

SOURCE_PATH = os.path.join(os.path.dirname(__file__), "syncbn.cu")
# Input dtype name -> the C++ type the kernels are instantiated on.
CTYPES = {"float16": "half_t", "bfloat16": "bf16_t", "float32": "float", "float64": "double"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
PARAM_CTYPES = {"float32": "float", "float64": "double"}
ARCHITECTURES = ("compute_70", "compute_80", "compute_90")
LAYOUTS = ("cs", "cl")                 # channel-second (B > 1) and channel-last (B == 1) kernels
REDUCTIONS = ("moments", "backward")
PASSES = ("moments", "normalize", "backward", "dx")

# The block-size limit every kernel is compiled for (__launch_bounds__), and the threads per SM
# its register budget must allow: 65536 / 1024 = 64 registers per thread, 50% occupancy.
MAX_THREADS = 512
MIN_THREADS_PER_SM = 1024
LOADS = 4                              # default 16-byte loads in flight per array and thread

# Every kernel's parameters in order, as the *_PARAMS macros of syncbn.cu declare them (the kernel
# emulator checks the names against the source): host code fills them by name, with the values
# the builders of _launch.py (one per kernel) and the launch plans give. Kinds:
# "T*" input dtype, "P*" parameter dtype, "S*" statistics dtype (float; double for double
# input), "d*" double, "I*" unsigned, "Q*" unsigned long long pointers; "i" int, "d" double,
# "Q" unsigned long long scalars. Every parameter takes one 8-byte cell (_launch.Arguments).
PARAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "moments": (("x", "T*"), ("A", "i"), ("C", "i"), ("B", "i"), ("pivot_state", "d*"), ("pivot_payload", "d*"),
                ("tag", "d"), ("part", "d*"), ("ticket", "I*"), ("pivot", "d*"), ("buf", "d*")),
    "normalize": (("x", "T*"), ("y", "T*"), ("A", "i"), ("C", "i"), ("B", "i"), ("buf", "d*"), ("pivot", "d*"),
                  ("tag", "d"), ("ranks", "d"), ("running_mean", "P*"), ("running_var", "P*"), ("momentum", "d"),
                  ("eps", "d"), ("unbiased", "i"), ("weight", "P*"), ("bias", "P*"), ("stats", "S*"),
                  ("report", "Q*"), ("seq", "Q"), ("pivot_state_out", "d*"), ("strict", "i"), ("residual", "T*"),
                  ("relu", "i")),
    "backward": (("dy", "T*"), ("x", "T*"), ("A", "i"), ("C", "i"), ("B", "i"), ("stats", "S*"), ("tag", "d"),
                 ("part", "d*"), ("ticket", "I*"), ("weight_grad", "P*"), ("bias_grad", "P*"), ("buf", "d*"),
                 ("y", "T*")),
    "dx": (("dy", "T*"), ("x", "T*"), ("dx", "T*"), ("A", "i"), ("C", "i"), ("B", "i"), ("stats", "S*"),
           ("buf", "d*"), ("count", "d*"), ("tag", "d"), ("ranks", "d"), ("report", "Q*"), ("seq", "Q"), ("y", "T*"),
           ("dresidual", "T*")),
}


def options(loads: int = LOADS) -> tuple[str, ...]:
    """NVRTC (and emulator) options: the language level and the compile-time settings."""
    return ("--std=c++17", f"-DCUSYNCBN_MAX_THREADS={MAX_THREADS}",
            f"-DCUSYNCBN_MIN_THREADS_PER_SM={MIN_THREADS_PER_SM}", f"-DCUSYNCBN_LOADS={int(loads)}")


def source() -> str:
    with open(SOURCE_PATH, encoding="utf-8") as f:
        return f.read()


def vector_widths(dtype_name: str) -> tuple[int, ...]:
    """Every width the kernels are instantiated for, widest (16 bytes) first, then the
    narrower powers of two for extents or pointers that the widest does not fit."""
    return _WIDTHS[dtype_name]


_WIDTHS = {name: tuple(16 // size >> k for k in range((16 // size).bit_length())) for name, size in ITEMSIZE.items()}


def kernel_key(kind: str, layout: str, vec: int, pname: str) -> str:
    """The Python-side name of one instantiation (``moments`` and ``dx`` have no parameter type)."""
    return f"{kind}_{layout}{vec}" if kind in _UNTYPED else f"{kind}_{layout}{vec}_{pname}"


_UNTYPED = ("moments", "dx")             # kernels that take no parameter-type array


def name_expressions(dtype_name: str) -> dict[str, str]:
    """Every kernel used for inputs of ``dtype_name``, keyed by ``kernel_key``."""
    t = CTYPES[dtype_name]
    names: dict[str, str] = {}
    for vec in vector_widths(dtype_name):
        for layout in LAYOUTS:
            for kind in ("normalize", "backward"):
                for pname, p in PARAM_CTYPES.items():
                    names[kernel_key(kind, layout, vec, pname)] = f"{kind}_{layout}<{t}, {p}, {vec}>"
            for kind in _UNTYPED:
                names[kernel_key(kind, layout, vec, "")] = f"{kind}_{layout}<{t}, {vec}>"
    return names
