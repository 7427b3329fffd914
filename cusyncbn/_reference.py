"""The float64 reference: batch norm on the global batch, from the textbook formulas.

Written from the formulas, not from cusyncbn's code (it imports none of it): channel axis
moved last, statistics over all other axes, the gradient by the chain rule written out.
It is the tests' oracle, and what the benchmark (``cusyncbn.bench``) and the launch-
configuration sweep (``cusyncbn._sweep``) check every result against before they time it.
Every function takes ``xp``, the array module of its inputs: NumPy (the default), or CuPy
for arrays on a GPU.
"""
from __future__ import annotations

from typing import Any

import numpy as np

CHANNEL_LAST = {"NC": False, "NCL": False, "NCHW": False, "NCDHW": False,
                "NLC": True, "NHWC": True, "NDHWC": True}


def _to_rows(a: Any, data_format: str, xp: Any) -> Any:
    """(rows, C) float64 view of ``a`` whatever its layout."""
    a = xp.asarray(a, dtype=xp.float64)
    if not CHANNEL_LAST[data_format] and a.ndim > 2:
        a = xp.moveaxis(a, 1, -1)
    return a.reshape(-1, a.shape[-1])


def _from_rows(rows: Any, shape: tuple, data_format: str, xp: Any) -> Any:
    if not CHANNEL_LAST[data_format] and len(shape) > 2:
        moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
        return xp.moveaxis(rows.reshape(moved), -1, 1)
    return rows.reshape(shape)


def forward(x: Any, weight: Any, bias: Any, eps: float, data_format: str, xp: Any = np) -> tuple:
    """Training forward. Returns y, batch mean, biased batch variance (all float64)."""
    rows = _to_rows(x, data_format, xp)
    mean = rows.mean(axis=0)
    var = ((rows - mean) ** 2).mean(axis=0)
    y = (rows - mean) / xp.sqrt(var + eps) * weight + bias
    return _from_rows(y, xp.shape(x), data_format, xp), mean, var


def backward(x: Any, dy: Any, weight: Any, eps: float, data_format: str, xp: Any = np) -> tuple:
    """Gradients of sum(y * dy) for the training forward: dx, dweight, dbias."""
    rows = _to_rows(x, data_format, xp)
    g = _to_rows(dy, data_format, xp)
    n = rows.shape[0]
    mean = rows.mean(axis=0)
    var = ((rows - mean) ** 2).mean(axis=0)
    invstd = 1.0 / xp.sqrt(var + eps)
    xhat = (rows - mean) * invstd
    dbias = g.sum(axis=0)
    dweight = (g * xhat).sum(axis=0)
    dxhat = g * weight
    dx = invstd / n * (n * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0))
    return _from_rows(dx, xp.shape(x), data_format, xp), dweight, dbias


def eval_forward(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, eps: float,
                 data_format: str, xp: Any = np) -> Any:
    """Eval forward with fixed statistics: (x - running_mean) / sqrt(running_var + eps) * weight + bias."""
    rows = _to_rows(x, data_format, xp)
    y = (rows - running_mean) / xp.sqrt(running_var + eps) * weight + bias
    return _from_rows(y, xp.shape(x), data_format, xp)


def update_running(running_mean: Any, running_var: Any, mean: Any, var: Any, n: int, momentum: float,
                   unbiased: bool = False) -> tuple:
    """Paddle's convention: running = running * momentum + batch * (1 - momentum)."""
    if n == 0:
        return running_mean, running_var
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return (running_mean * momentum + mean * (1 - momentum),
            running_var * momentum + var * (1 - momentum))


def eval_backward(dy: Any, weight: Any, running_var: Any, eps: float, data_format: str, xp: Any = np) -> Any:
    """dx of the eval forward (fixed statistics): dy * weight / sqrt(running_var + eps)."""
    g = _to_rows(dy, data_format, xp)
    return _from_rows(g * weight / xp.sqrt(running_var + eps), xp.shape(dy), data_format, xp)


# -- the fused epilogue: y = act(BN(x) + residual) ---------------------------------------------

ACTIVATIONS = (None, "relu")


def _epilogue(z: Any, residual: Any, activation: str | None, xp: Any) -> tuple:
    """(z + residual, y): the pre-activation and ``act`` of it (``relu(t) = max(t, 0)``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    pre = z if residual is None else z + xp.asarray(residual, dtype=xp.float64)
    return pre, (xp.maximum(pre, 0.0) if activation == "relu" else pre)


def _pre_activation_grad(pre: Any, dy: Any, activation: str | None, xp: Any) -> Any:
    """d loss / d pre from d loss / d y: ``dy * (pre > 0)`` under ReLU, else ``dy``."""
    dy = xp.asarray(dy, dtype=xp.float64)
    return dy * (pre > 0) if activation == "relu" else dy


def fused_forward(x: Any, weight: Any, bias: Any, eps: float, data_format: str, residual: Any = None,
                  activation: str | None = None, xp: Any = np) -> tuple:
    """Training forward with the epilogue, ``y = act(BN(x) + residual)``. Returns y, batch mean,
    biased batch variance (all float64)."""
    z, mean, var = forward(x, weight, bias, eps, data_format, xp)
    return _epilogue(z, residual, activation, xp)[1], mean, var


def fused_backward(x: Any, dy: Any, weight: Any, bias: Any, eps: float, data_format: str, residual: Any = None,
                   activation: str | None = None, xp: Any = np) -> tuple:
    """Gradients of sum(y * dy) for :func:`fused_forward`: dx, dweight, dbias, dresidual. With
    ``pre = BN(x) + residual``, ``dpre = dy * (pre > 0)`` (ReLU) or ``dy``; ``dresidual = dpre``
    and the batch norm's gradients are those of ``dpre``."""
    pre = _epilogue(forward(x, weight, bias, eps, data_format, xp)[0], residual, None, xp)[0]
    dpre = _pre_activation_grad(pre, dy, activation, xp)
    return backward(x, dpre, weight, eps, data_format, xp) + (dpre,)


def fused_eval_forward(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, eps: float,
                       data_format: str, residual: Any = None, activation: str | None = None, xp: Any = np) -> Any:
    """Eval forward with the epilogue: ``act(eval_forward(x) + residual)``."""
    z = eval_forward(x, weight, bias, running_mean, running_var, eps, data_format, xp)
    return _epilogue(z, residual, activation, xp)[1]


def fused_eval_backward(x: Any, dy: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, eps: float,
                        data_format: str, residual: Any = None, activation: str | None = None,
                        xp: Any = np) -> tuple:
    """Gradients of sum(y * dy) for :func:`fused_eval_forward` (fixed statistics): dx, dweight,
    dbias, dresidual, with ``dpre`` as in :func:`fused_backward`:
    ``dx = dpre * weight / sqrt(running_var + eps)``, ``dweight = sum(dpre * xhat)``,
    ``dbias = sum(dpre)``, ``xhat = (x - running_mean) / sqrt(running_var + eps)``."""
    z = eval_forward(x, weight, bias, running_mean, running_var, eps, data_format, xp)
    dpre = _pre_activation_grad(_epilogue(z, residual, None, xp)[0], dy, activation, xp)
    xhat = (_to_rows(x, data_format, xp) - running_mean) / xp.sqrt(running_var + eps)
    g = _to_rows(dpre, data_format, xp)
    return (eval_backward(dpre, weight, running_var, eps, data_format, xp), (g * xhat).sum(axis=0), g.sum(axis=0),
            dpre)
