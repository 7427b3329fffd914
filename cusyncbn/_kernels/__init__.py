"""The CUDA source and the list of its template instantiations.

Shared by the CuPy backend (which compiles one module per input dtype, lazily, with
``cupy.RawModule``) and by the CI test that compiles every instantiation with NVRTC
on a machine without a GPU.
"""
from __future__ import annotations

import os

SOURCE_PATH = os.path.join(os.path.dirname(__file__), "syncbn.cu")
OPTIONS = ("--std=c++17",)
# Input dtype name -> the C++ type the kernels are instantiated on.
CTYPES = {"float16": "half_t", "bfloat16": "bf16_t", "float32": "float", "float64": "double"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
PARAM_CTYPES = {"float32": "float", "float64": "double"}
ARCHITECTURES = ("compute_70", "compute_80", "compute_90")


def source() -> str:
    with open(SOURCE_PATH, encoding="utf-8") as f:
        return f.read()


def vector_width(dtype_name: str) -> int:
    """Elements per 16-byte load."""
    return 16 // ITEMSIZE[dtype_name]


def vector_widths(dtype_name: str) -> tuple[int, ...]:
    """Every width the kernels are instantiated for, widest first: 16-byte loads, and
    narrower powers of two for extents that the widest does not divide."""
    widths, v = [], vector_width(dtype_name)
    while v >= 1:
        widths.append(v)
        v //= 2
    return tuple(widths)


def stats_ctype(dtype_name: str) -> str:
    return "double" if dtype_name == "float64" else "float"


def name_expressions(dtype_name: str) -> dict[str, str]:
    """Every kernel used for inputs of ``dtype_name``, keyed by a short Python-side name."""
    t, s = CTYPES[dtype_name], stats_ctype(dtype_name)
    names: dict[str, str] = {}
    for vec in vector_widths(dtype_name):
        for pname, p in PARAM_CTYPES.items():
            for layout in ("cs", "cl"):
                names[f"moments_{layout}{vec}_{pname}"] = f"moments_{layout}<{t}, {p}, {vec}>"
                names[f"backward_{layout}{vec}_{pname}"] = f"backward_{layout}<{t}, {p}, {vec}>"
        for cl in ("true", "false"):
            names[f"normalize_{cl}{vec}"] = f"normalize<{t}, {cl}, {vec}>"
            names[f"dx_{cl}{vec}"] = f"backward_elementwise<{t}, {cl}, {vec}>"
    for pname, p in PARAM_CTYPES.items():
        names[f"finalize_{pname}"] = f"forward_finalize<{s}, {p}>"
        names[f"eval_{pname}"] = f"eval_finalize<{s}, {p}>"
    return names
