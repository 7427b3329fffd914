"""Independent float64 reference for batch norm on the GLOBAL batch (the test oracle).

Written from the textbook formulas, not from cusyncbn's code: channel axis moved
last, statistics over all other axes, gradient by the chain rule written out.
"""
from __future__ import annotations

import numpy as np

CHANNEL_LAST = {"NC": False, "NCL": False, "NCHW": False, "NCDHW": False,
                "NLC": True, "NHWC": True, "NDHWC": True}


def _to_rows(a: np.ndarray, data_format: str) -> np.ndarray:
    """(rows, C) float64 view of ``a`` whatever its layout."""
    a = np.asarray(a, dtype=np.float64)
    if not CHANNEL_LAST[data_format] and a.ndim > 2:
        a = np.moveaxis(a, 1, -1)
    return a.reshape(-1, a.shape[-1])


def _from_rows(rows: np.ndarray, shape: tuple, data_format: str) -> np.ndarray:
    if not CHANNEL_LAST[data_format] and len(shape) > 2:
        moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
        return np.moveaxis(rows.reshape(moved), -1, 1)
    return rows.reshape(shape)


def forward(x, weight, bias, eps, data_format):
    """Training forward. Returns y, batch mean, biased batch variance (all float64)."""
    rows = _to_rows(x, data_format)
    mean = rows.mean(axis=0)
    var = ((rows - mean) ** 2).mean(axis=0)
    y = (rows - mean) / np.sqrt(var + eps) * weight + bias
    return _from_rows(y, np.shape(x), data_format), mean, var


def backward(x, dy, weight, eps, data_format):
    """Gradients of sum(y * dy) for the training forward: dx, dweight, dbias."""
    rows = _to_rows(x, data_format)
    g = _to_rows(dy, data_format)
    n = rows.shape[0]
    mean = rows.mean(axis=0)
    var = ((rows - mean) ** 2).mean(axis=0)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (rows - mean) * invstd
    dbias = g.sum(axis=0)
    dweight = (g * xhat).sum(axis=0)
    dxhat = g * weight
    dx = invstd / n * (n * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0))
    return _from_rows(dx, np.shape(x), data_format), dweight, dbias


def eval_forward(x, weight, bias, running_mean, running_var, eps, data_format):
    rows = _to_rows(x, data_format)
    y = (rows - running_mean) / np.sqrt(running_var + eps) * weight + bias
    return _from_rows(y, np.shape(x), data_format)


def update_running(running_mean, running_var, mean, var, n, momentum, unbiased=False):
    """Paddle's convention: running = running * momentum + batch * (1 - momentum)."""
    if n == 0:
        return running_mean, running_var
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return (running_mean * momentum + mean * (1 - momentum),
            running_var * momentum + var * (1 - momentum))


def eval_backward(dy, weight, running_var, eps, data_format):
    """dx of the eval forward (fixed statistics): dy * weight / sqrt(running_var + eps)."""
    g = _to_rows(dy, data_format)
    return _from_rows(g * weight / np.sqrt(running_var + eps), np.shape(dy), data_format)
