"""DLPack at the layer's boundary: where an input lives, and handing results back.

Inputs from any DLPack producer (NumPy, CuPy, torch, JAX, Paddle) are imported
without a copy by the backend of the layer's device; an input on another device is
an error, never a silent copy. With ``output="input"`` a result goes back to the
framework the input came from, again through DLPack.
"""
from __future__ import annotations

from typing import Any

# DLPack device types (dlpack.h: DLDeviceType).
_CPU_TYPES = {1, 3}          # kDLCPU, kDLCUDAHost
_CUDA_TYPES = {2, 13}        # kDLCUDA, kDLCUDAManaged


def device_of(x: Any) -> str:
    """Where an array lives, named as ``device=`` and :func:`set_device` name devices.

    A layer made with ``device=cusyncbn.device_of(x)`` takes ``x`` whatever the machine:
    a JAX or torch array may be on the GPU or the CPU, and the default device (the GPU
    wherever CuPy sees one) refuses host arrays.

    Args:
        x: a NumPy or CuPy array, or any DLPack producer (torch, JAX, Paddle...).

    Returns:
        ``"cpu"`` or ``"gpu:N"`` (N: the CUDA device index); for another DLPack
        device type, a description that ``device=`` refuses.

    Raises:
        TypeError: ``x`` is not a DLPack producer (e.g. a list).

    Example:
        >>> import numpy as np, cusyncbn
        >>> cusyncbn.device_of(np.zeros(3))
        'cpu'
    """
    if not hasattr(x, "__dlpack_device__"):
        raise TypeError(f"device_of needs an array (NumPy, CuPy or a DLPack producer), got {type(x).__name__}")
    kind, index = x.__dlpack_device__()
    kind = int(kind)
    if kind in _CPU_TYPES:
        return "cpu"
    if kind in _CUDA_TYPES:
        return f"gpu:{int(index)}"
    return f"DLPack device type {kind}:{int(index)}"


def framework_of(x: Any) -> str:
    """The top-level package that made ``x`` (``"numpy"``, ``"cupy"``, ``"torch"``, ``"jax"``...)."""
    module = type(x).__module__.split(".")[0]
    return "jax" if module == "jaxlib" else module


def to_host(value: Any) -> Any:
    """A NumPy copy-or-view of ``value`` on the host (torch, CuPy, DLPack producers, array-likes)."""
    import numpy as np
    if hasattr(value, "detach"):                        # torch
        return value.detach().cpu().numpy()
    if type(value).__module__.split(".")[0] == "cupy":
        return value.get()
    if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
        return np.from_dlpack(value)
    return np.asarray(value)


def to_framework(y: Any, framework: str) -> Any:
    """Hand ``y`` (a NumPy or CuPy array) to ``framework`` through DLPack, zero-copy."""
    if framework in ("numpy", "cupy") and framework_of(y) == framework:
        return y
    if framework == "torch":
        import torch
        return torch.from_dlpack(y)
    if framework == "jax":
        import jax.numpy as jnp
        return jnp.from_dlpack(y)
    if framework == "paddle":
        import paddle
        return paddle.from_dlpack(y)
    if framework == "numpy":
        import numpy as np
        return np.from_dlpack(y)
    if framework == "cupy":
        import cupy
        return cupy.from_dlpack(y)
    return y
