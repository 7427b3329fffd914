"""The CPU backend: the steps of ``_backend.py`` in NumPy.

Sums are accumulated in float64 whatever the input dtype (the CPU is not
bandwidth-bound on a few extra conversions, and float64 keeps channel-last
reductions of many rows accurate); temporaries are bounded by working in blocks
of rows of ``x3``.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import numpy as np

from ._backend import DESYNC, NONFINITE, Backend, BackwardPayload, ForwardPayload, Stats
from ._dlpack import device_of

_BLOCK_ELEMENTS = 1 << 20


def _row_blocks(x3: Any) -> Iterator[slice]:
    rows = x3.shape[0]
    per_row = max(1, x3.shape[1] * x3.shape[2])
    step = max(1, _BLOCK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _blocked_channel_sum(x3: Any, term: Callable[[slice], Any]) -> Any:
    """Sum over axes (0, 2) of ``term(rows)`` evaluated block by block, in float64."""
    total = np.zeros(x3.shape[1], dtype=np.float64)
    for rows in _row_blocks(x3):
        total += term(rows).sum(axis=(0, 2), dtype=np.float64)
    return total


def _pivot_of(pivot_state: Any, pivot_payload: Any, channels: int) -> Any:
    """The pivot K per channel (see ``_backend.py``): the means of a reduced payload, else the
    pivot state, else 0; 0 where not finite (``pivot_of`` in syncbn.cu)."""
    if pivot_payload is not None:
        reduced = ForwardPayload(pivot_payload, channels)
        n = reduced.count[0]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            pivot = reduced.sum_x / n if n > 0 else np.zeros(channels)
    elif pivot_state is not None:
        pivot = np.array(pivot_state, dtype=np.float64)
    else:
        return np.zeros(channels, dtype=np.float64)
    pivot = np.asarray(pivot, dtype=np.float64).copy()
    pivot[~np.isfinite(pivot)] = 0.0
    return pivot


def _col(v: Any) -> Any:
    return v[None, :, None]


class NumpyBackend(Backend):
    device = "cpu"
    xp = np

    def __init__(self) -> None:
        super().__init__()
        self._pivots = threading.local()   # .last: the pivot of this thread's latest moments

    def is_native(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def import_array(self, x: Any, what: str) -> Any:
        if isinstance(x, np.ndarray):
            return x
        if hasattr(x, "__dlpack_device__"):
            where = device_of(x)
            if where != "cpu":
                raise ValueError(f"{what} lives on {where} but this layer is on the CPU; move it to the "
                                 "host first, or create the layer with cusyncbn.set_device('gpu')")
            if getattr(x, "requires_grad", False):
                x = x.detach()
            try:
                return np.from_dlpack(x)
            except (TypeError, BufferError, RuntimeError) as exc:
                if "bfloat16" in str(getattr(x, "dtype", "")):
                    return _bfloat16_to_numpy(x)
                raise TypeError(f"{what}: cannot import a {type(x).__name__} through DLPack: {exc}") from exc
        message = f"{what} must be an array (NumPy or a DLPack producer), got {type(x).__name__}"
        try:
            array = np.asarray(x)
        except Exception as exc:                       # e.g. ragged nested sequences
            raise TypeError(message) from exc
        if array.dtype.kind in "OSUV":                 # NumPy wraps anything: str, bytes, None, dicts...
            raise TypeError(message)
        return array

    def local_moments(self, *, x3: Any, pivot_state: Any, tag: int, buf: Any, pivot_payload: Any = None) -> None:
        channels = x3.shape[1]
        n = x3.shape[0] * x3.shape[2]
        pivot = self._pivots.last = _pivot_of(pivot_state, pivot_payload, channels)
        out = ForwardPayload(buf, channels)
        out.count[0] = n
        _write_tags(out.tags, tag)
        if n == 0:
            out.sum_x[...] = 0.0
            out.m2_pivot[...] = 0.0
            return
        with np.errstate(invalid="ignore", over="ignore"):     # NaN/Inf input: flagged after the reduce
            mean = _blocked_channel_sum(x3, lambda r: x3[r]) / n
            m2 = _blocked_channel_sum(x3, lambda r: np.square(x3[r].astype(np.float64) - _col(mean)))
            out.sum_x[...] = n * mean
            out.m2_pivot[...] = m2 + n * np.square(mean - pivot)

    def normalize_batch(self, *, x3: Any, buf: Any, tag: int, ranks: int, running_mean: Any, running_var: Any,
                        momentum: float, eps: float, unbiased: bool, weight: Any, bias: Any, stats: Stats,
                        y3: Any, pivot_state_out: Any = None, strict: bool = False, residual3: Any = None,
                        relu: bool = False) -> None:
        channels = stats.mean.shape[0]
        reduced = ForwardPayload(buf, channels)
        count = reduced.count[0]
        desync = not _tags_agree(reduced.tags, tag, ranks)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if count > 0:
                mean = reduced.sum_x / count
                dev = mean - self._pivots.last                 # the pivot local_moments used
                var = np.maximum((reduced.m2_pivot - count * dev * dev) / count, 0.0)
            else:
                mean = np.zeros(channels)
                var = np.zeros(channels)
            finite = np.isfinite(mean) & np.isfinite(var)
            moves = count > 0 and not desync and not (strict and not finite.all())
            if pivot_state_out is not None and moves:
                pivot_state_out[finite] = mean[finite]
            self._fill(stats, mean, 1.0 / np.sqrt(var + eps), weight, bias)
            stats.flags[0] = NONFINITE * (not finite.all()) + DESYNC * desync
            if moves and running_mean is not None and running_var is not None:
                var_run = var * (count / (count - 1)) if (unbiased and count > 1) else var
                new_mean = running_mean * momentum + mean * (1.0 - momentum)
                new_var = running_var * momentum + var_run * (1.0 - momentum)
                running_mean[finite] = new_mean[finite]
                running_var[finite] = new_var[finite]
        self.normalize(x3, stats, y3, residual3, relu)

    def normalize_fixed(self, *, x3: Any, running_mean: Any, running_var: Any, eps: float, weight: Any, bias: Any,
                        stats: Stats, y3: Any, residual3: Any = None, relu: bool = False) -> None:
        invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        self._fill(stats, running_mean.astype(np.float64), invstd, weight, bias)
        stats.flags[0] = 0
        self.normalize(x3, stats, y3, residual3, relu)

    @staticmethod
    def _fill(stats: Stats, mean: Any, invstd: Any, weight: Any, bias: Any) -> None:
        stats.mean[...] = mean
        stats.invstd[...] = invstd
        stats.scale[...] = invstd if weight is None else invstd * weight.astype(np.float64)
        stats.offset[...] = 0.0 if bias is None else bias

    @staticmethod
    def normalize(x3: Any, stats: Stats, y3: Any, residual3: Any = None, relu: bool = False) -> None:
        """``y3`` from ``x3`` and the epilogue (``_backend.py``), in the stats dtype."""
        mean, scale, offset = _col(stats.mean), _col(stats.scale), _col(stats.offset)
        with np.errstate(invalid="ignore", over="ignore"):
            for rows in _row_blocks(x3):
                z = (x3[rows].astype(mean.dtype) - mean) * scale + offset
                if residual3 is not None:
                    z += residual3[rows].astype(mean.dtype)
                if relu:
                    z[z < 0] = 0                           # NaN and -0 stay, as in the kernels
                y3[rows] = z

    def backward_reduce(self, *, dy3: Any, x3: Any, stats: Stats, weight_grad: Any, bias_grad: Any,
                        tag: int, buf: Any, y3: Any = None) -> None:
        out = BackwardPayload(buf, x3.shape[1])
        mean64 = _col(stats.mean.astype(np.float64))
        with np.errstate(invalid="ignore", over="ignore"):     # Inf/NaN propagate, as the forward's do
            out.sum_dy[...] = _blocked_channel_sum(dy3, lambda r: _masked(dy3, y3, r))
            out.sum_dy_xmu[...] = _blocked_channel_sum(
                x3, lambda r: _masked(dy3, y3, r).astype(np.float64) * (x3[r].astype(np.float64) - mean64))
            _write_tags(out.tags, tag)
            if weight_grad is not None:
                weight_grad += (out.sum_dy_xmu * stats.invstd).astype(weight_grad.dtype)
            if bias_grad is not None:
                bias_grad += out.sum_dy.astype(bias_grad.dtype)

    def backward_input(self, *, dy3: Any, x3: Any, stats: Stats, buf: Any, count: Any, tag: int, ranks: int,
                       dx3: Any, y3: Any = None, dresidual3: Any = None) -> None:
        scale = _col(stats.scale)
        with np.errstate(invalid="ignore", over="ignore"):     # Inf/NaN propagate, as the forward's do
            if count is None:
                stats.flags[1] = 0
                for rows in _row_blocks(dy3):
                    g = _masked(dy3, y3, rows)
                    if dresidual3 is not None:
                        dresidual3[rows] = g
                    if dx3 is not None:
                        dx3[rows] = g.astype(scale.dtype) * scale
                return
            reduced = BackwardPayload(buf, scale.shape[1])
            stats.flags[1] = DESYNC * (not _tags_agree(reduced.tags, tag, ranks))
            n = max(float(count[0]), 1.0)
            mean_dy = _col((reduced.sum_dy / n).astype(scale.dtype))
            proj = _col((reduced.sum_dy_xmu / n * stats.invstd.astype(np.float64) ** 2).astype(scale.dtype))
            mean = _col(stats.mean)
            for rows in _row_blocks(dy3):
                g = _masked(dy3, y3, rows)
                if dresidual3 is not None:
                    dresidual3[rows] = g
                xmu = x3[rows].astype(scale.dtype) - mean
                dx3[rows] = (g.astype(scale.dtype) - mean_dy - xmu * proj) * scale


def _masked(dy3: Any, y3: Any, rows: slice) -> Any:
    """The rows of ``g``: ``dy3`` where ``y3 > 0`` and 0 elsewhere (``y3`` None: ``dy3`` itself)."""
    if y3 is None:
        return dy3[rows]
    g = dy3[rows].copy()
    g[~(y3[rows] > 0)] = 0
    return g


def _write_tags(tags: Any, tag: int) -> None:
    tags[0] = tag
    tags[1] = float(tag) * tag


def _tags_agree(sums: Any, tag: int, ranks: int) -> bool:
    """Whether every rank contributed ``tag``: ``sums = (sum t, sum t^2)`` over ``ranks`` ranks."""
    return bool(sums[0] == ranks * tag and sums[1] == ranks * float(tag) * tag)


def _bfloat16_to_numpy(x: Any) -> Any:
    """A bfloat16 DLPack producer as an ``ml_dtypes.bfloat16`` NumPy array (NumPy has no bfloat16)."""
    try:
        import ml_dtypes
    except ImportError as exc:
        raise TypeError("bfloat16 input on the CPU needs the ml_dtypes package (pip install ml_dtypes)") from exc
    if hasattr(x, "view") and type(x).__module__.startswith("torch"):
        import torch
        return np.from_dlpack(x.view(torch.int16)).view(ml_dtypes.bfloat16)
    return np.asarray(x).astype(ml_dtypes.bfloat16)
