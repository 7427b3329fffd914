"""What every pass checks before any collective, written once.

Data formats, the ``(A, C, B)`` view of an input (see ``_backend.py``), and the checks
of inputs, gradients, parameters and options. Each check raises a built-in exception
(``ValueError`` / ``TypeError``) whose message names what was received and what was
expected, before any collective is made, so a bad call changes nothing.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._backend import Backend, dtype_name

# data_format -> whether the channel axis is last.
FORMATS = {"NC": False, "NCL": False, "NCHW": False, "NCDHW": False,
           "NLC": True, "NHWC": True, "NDHWC": True}
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
PARAM_NAMES = ("float32", "float64")
# Per-channel arrays a pass writes into (the others it only reads).
UPDATED_IN_PLACE = ("running_mean", "running_var", "weight_grad_out", "bias_grad_out")


def channel_last(data_format: str) -> bool:
    """Whether the channel axis of ``data_format`` is the last one."""
    try:
        return FORMATS[data_format]
    except (KeyError, TypeError):
        raise ValueError(f"data_format must be one of {list(FORMATS)}, got {data_format!r}") from None


def shape3(shape: tuple, channels: int, last: bool) -> tuple[int, int, int]:
    """``(A, C, B)`` of an input of ``shape``: ``(N, C, prod(spatial))`` or ``(N * prod(spatial), C, 1)``."""
    if last or len(shape) == 2:
        return math.prod(shape[:-1]), channels, 1
    return shape[0], channels, math.prod(shape[2:])


def view3(x: Any, channels: int, last: bool) -> Any:
    """``x`` viewed as ``(A, C, B)`` (see :func:`shape3`)."""
    return x.reshape(shape3(tuple(x.shape), channels, last))


def check_momentum(momentum: Any, where: str) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)):
        raise TypeError(f"{where}: momentum must be a float in [0, 1], got {momentum!r}")
    value = float(momentum)
    if not 0.0 <= value <= 1.0:                        # NaN fails too
        raise ValueError(f"{where}: momentum must be in [0, 1], got {momentum!r}")
    return value


def check_epsilon(epsilon: Any, where: str) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating, np.integer)):
        raise TypeError(f"{where}: epsilon must be a finite float >= 0, got {epsilon!r}")
    value = float(epsilon)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{where}: epsilon must be a finite float >= 0, got {epsilon!r}")
    return value


def check_bool(value: Any, what: str, where: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {what} must be True or False, got {value!r}")
    return bool(value)


def _count_words(counts: tuple) -> str:
    """``(2, 3, 4, 5)`` -> "2 to 5", ``(2, 3)`` -> "2 or 3", ``(4,)`` -> "4"."""
    counts = tuple(sorted(counts))
    if len(counts) > 2 and counts == tuple(range(counts[0], counts[-1] + 1)):
        return f"{counts[0]} to {counts[-1]}"
    return " or ".join(map(str, counts)) if len(counts) < 3 else ", ".join(map(str, counts[:-1])) + f" or {counts[-1]}"


def check_ndim(x: Any, ndims: tuple, data_format: str, where: str) -> None:
    """That ``x`` has one of ``ndims`` dimensions: a local layer's own ranks of input
    (``BatchNorm2D``: 4), narrower than what the passes take (2 to 5). A local layer makes no
    collective, so no rank waits on this check. Something without a ``shape`` is left to
    the pass, which names what it is.

    Raises:
        ValueError: another number of dimensions.
    """
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) not in ndims:
        raise ValueError(f"{where}: x must have {_count_words(ndims)} dimensions "
                         f"for data_format {data_format!r}, got shape {tuple(shape)}")


def is_float(dtype: Any) -> bool:
    return dtype.kind == "f" or dtype_name(dtype) == "bfloat16"


def check_input(backend: Backend, x: Any, channels: int | None, last: bool, ndims: tuple, data_format: str,
                where: str) -> Any:
    """``x`` as a contiguous array of ``backend`` with a floating dtype and ``channels``
    channels on the axis ``data_format`` gives it (any count when ``channels`` is None)."""
    x = backend.import_array(x, "x")
    if not is_float(x.dtype):
        raise TypeError(f"{where}: x must have a floating dtype ({', '.join(FLOAT_NAMES)}), got {x.dtype}")
    if x.ndim not in ndims:
        raise ValueError(f"{where}: x must have {_count_words(ndims)} dimensions "
                         f"for data_format {data_format!r}, got shape {tuple(x.shape)}")
    axis = x.ndim - 1 if last else 1
    if channels is not None and x.shape[axis] != channels:
        raise ValueError(f"{where}: x has {x.shape[axis]} channels on axis {axis} "
                         f"(data_format {data_format!r}, shape {tuple(x.shape)}), expected num_features={channels}")
    limit = backend.max_extent
    if limit is not None and x.size:
        rows, _, positions = shape3(tuple(x.shape), x.shape[axis], last)
        if max(rows, positions) > limit:
            raise ValueError(f"{where}: x of shape {tuple(x.shape)} has {rows} rows and "
                             f"{positions} positions per channel; the {backend.device} kernels take "
                             f"at most {limit} of each (split the batch)")
    return backend.contiguous(x)


def check_grad_output(backend: Backend, dy: Any, shape: tuple, dtype: Any, where: str) -> Any:
    """``dy`` as a contiguous array of ``backend`` with ``shape``, cast to ``dtype``."""
    dy = backend.import_array(dy, "dy")
    if not is_float(dy.dtype):
        raise TypeError(f"{where}: dy must have a floating dtype, got {dy.dtype}")
    if tuple(dy.shape) != shape:
        raise ValueError(f"{where}: dy has shape {tuple(dy.shape)}, expected {shape} (the forward's input)")
    if dy.dtype != dtype:
        with backend.scope():
            dy = dy.astype(dtype)
    return backend.contiguous(dy)


#: The activations of the fused epilogue (``functional.sync_batch_norm``'s ``activation``).
ACTIVATIONS = (None, "relu")


def check_activation(activation: Any, where: str) -> bool:
    """Whether ``activation`` (one of :data:`ACTIVATIONS`) is ReLU.

    Raises:
        ValueError: any other value."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f"{where}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_residual(backend: Backend, residual: Any, x: Any, where: str) -> Any:
    """``residual`` as a C-contiguous array of ``backend`` with the shape and dtype of ``x``
    (the validated input; same data format), copied only when its strides are not those.

    Raises:
        TypeError: not an array; another dtype than ``x``'s (no implicit cast: the residual is
            read as it is).
        ValueError: another shape than ``x``'s."""
    residual = backend.import_array(residual, "residual")
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"{where}: residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)} (x's; "
                         "the same data format)")
    if residual.dtype != x.dtype:
        raise TypeError(f"{where}: residual has dtype {residual.dtype}, expected x's dtype {x.dtype}")
    return backend.contiguous(residual)


def check_params(backend: Backend, channels: int, where: str, **arrays: Any) -> dict:
    """The per-channel arrays (running statistics, weight, bias; None allowed) as arrays of
    ``backend``: shape ``(channels,)``, contiguous, one shared float32 / float64 dtype (the
    kernels are instantiated per parameter dtype). The result maps each role to its array
    and ``"dtype"`` to that dtype's name (None without any array).

    Raises:
        TypeError: an array written in place (``UPDATED_IN_PLACE``) given as a list, tuple
            or scalar; a dtype other than float32/float64, or dtypes that differ.
        ValueError: a wrong shape; a non-contiguous array."""
    out: dict[str, Any] = {}
    dtypes = set()
    for role, value in arrays.items():
        if value is None:
            out[role] = None
            continue
        if role in UPDATED_IN_PLACE and not (backend.is_native(value) or hasattr(value, "__dlpack__")):
            # A list or a scalar would be copied, and the update lost with the copy.
            raise TypeError(f"{where}: {role} is updated in place, so it must be an array (NumPy, CuPy or a "
                            f"DLPack producer), got {type(value).__name__}")
        arr = backend.import_array(value, role)
        if tuple(arr.shape) != (channels,):
            raise ValueError(f"{where}: {role} has shape {tuple(arr.shape)}, expected ({channels},)")
        if dtype_name(arr.dtype) not in PARAM_NAMES:
            raise TypeError(f"{where}: {role} must be float32 or float64, got {arr.dtype}")
        if not arr.flags.c_contiguous:
            raise ValueError(f"{where}: {role} must be contiguous (it may be updated in place)")
        dtypes.add(dtype_name(arr.dtype))
        out[role] = arr
    if len(dtypes) > 1:
        given = {k: dtype_name(v.dtype) for k, v in out.items() if v is not None}
        raise TypeError(f"{where}: running statistics, weight and bias must share one dtype, got {given}")
    out["dtype"] = dtypes.pop() if dtypes else None
    return out
