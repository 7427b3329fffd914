"""The array work of batch normalization, behind one small interface.

The functional core (``functional.py``) owns the protocol: what is computed, in which order, and
where the collectives go. A backend owns the arrays: it turns inputs into its own
arrays and runs the few fused steps below. ``NumpyBackend`` does them with NumPy
on the CPU; ``CupyBackend`` launches the CUDA kernels in ``_kernels/syncbn.cu``.

Vocabulary: one word per quantity, the same here, in ``_backend_numpy.py``,
``_backend_cupy.py``, ``functional.py`` / ``_planned.py`` and ``_kernels/syncbn.cu`` (whose
kernel parameters, listed in ``_kernels.PARAMS``, carry these names). ``C`` channels; the
"stats dtype" is float32, or float64 for float64 input::

    name             meaning                                                shape        dtype
    x3, y3, dy3, dx3 input, output and their gradients viewed as (A, C, B)  (A, C, B)    input
    A, C, B          rows, channels, elements per (row, channel)            -            int
    n, N             this rank's count A * B; the global count (sum of n)   -            float64
    count            the reduced forward payload's count slot (N)           (1,)         float64
    mean, var        the channel's global mean, biased variance             (C,)         float64
    invstd           1 / sqrt(var + eps)                                    (C,)         stats
    scale, offset    the folded affine, y = (x - mean) * scale + offset:    (C,)         stats
                     scale = invstd * weight, offset = bias
    m2               M2, a sum of squared deviations from a mean            (C,)         float64
    sum_x, m2_pivot  the forward payload's sums of x and of (x - K)^2       (C,)         float64
    pivot            K, what the ranks' sums are combined around (the same  (C,)         float64
                     on every rank; see "The pivot")
    pivot_state      the pivot of a layer's next call: its previous batch's (C,)         float64
                     global mean (``pivot_state_out``: where normalize
                     stores the next one)
    pivot_payload    a reduced forward payload whose means are the pivot    (2C + 3,)    float64
    x0               a kernel's channel's first element x[0, c, 0]: per-    -            accumulator
                     rank sums s1 = sum(x - x0), s2 = sum((x - x0)^2)
    sum_dy           sum of dy (this rank's: its bias gradient)             (C,)         float64
    sum_dy_xmu       sum of dy * (x - mean) (times invstd: weight gradient) (C,)         float64
    mean_dy          sum_dy / N, global                                     (C,)         stats
    proj             invstd^2 * sum_dy_xmu / N: dy's projection on xhat,    (C,)         stats
                     per unit of (x - mean)
    tag (t), ranks   this rank's collective tag, the number of ranks        -            float64
    buf              an all-reduce payload (forward 2C + 3, backward 2C + 2 float64 values)
    residual3        the residual the epilogue adds, viewed as (A, C, B)    (A, C, B)    input
    relu             whether the epilogue ends with ReLU (kernels: an int)  -            bool
    mask             y > 0 under ReLU (y: the forward's output), else 1     (A, C, B)    -
    g                the masked gradient dy * mask                          (A, C, B)    input
    dresidual3       the residual's gradient, g                             (A, C, B)    input
    stats            a forward's :class:`Stats`
    eps              epsilon, added to var (the public argument ``epsilon``) -            float64

Notation. The input is viewed as ``x3`` of shape ``(A, C, B)``: channel-second layouts are
``(N, C, prod(spatial))``, channel-last layouts ``(N * prod(spatial), C, 1)``. For channel
``c`` on rank ``r`` the local count is ``n_r = A * B`` and the local statistics are the mean
``m_r`` and ``M2_r``, the sum of squared deviations from ``m_r`` (never E[x^2] - E[x]^2).
The NumPy backend makes two passes in float64: the mean, then the squared deviations from
it. The kernels make one pass of sums around the channel's first element ``x0`` (``s1``,
``s2`` above), then ``m_r = x0 + s1 / n`` and ``M2_r = s2 - s1^2 / n``: around ``x0`` the numbers
that cancel are of the size of the channel's spread, not of its mean.

Forward all-reduce payload (float64, length ``2C + 3``; its slots are :class:`ForwardPayload`),
with ``K`` the pivot (identical on every rank; see "The pivot" below) and ``t`` this rank's
collective tag (see below)::

    sum_x     = n_r * m_r                   the sum of x           (C values)
    m2_pivot  = M2_r + n_r * (m_r - K)^2    the sum of (x - K)^2   (C values)
    count     = n_r
    tags      = (t, t^2)

Summed over ranks this gives ``N = count``, ``mean = sum_x / N`` and, by Chan's parallel
combine written as sums, ``M2 = m2_pivot - N * (mean - K)^2``, ``var = M2 / N`` (biased),
``invstd = 1 / sqrt(var + eps)``.

The pivot. The combine cancels numbers of size ``N (mean - K)^2``: in float64 it keeps
``var`` to 1e-6 only while ``(mean - K)^2 / var`` stays below about 1e9, so ``K`` must sit
near the batch mean, on every rank alike. It is the global mean of the previous batch of
the same running statistics (the *pivot state*: ``normalize_batch`` stores it into
``pivot_state_out`` from the reduced payload, so every rank holds the same value). A call
without a pivot state (a layer's first training call, or a call without running statistics)
makes two all-reduces: the first with ``K = 0`` gives the global mean, the second, around
that mean (``pivot_payload``), gives the payload the normalization uses. Running
statistics, only when ``N > 0``, the ranks agree (below) and the channel's ``mean`` and
``var`` are finite::

    running_mean = running_mean * momentum + mean * (1 - momentum)
    running_var  = running_var  * momentum + var' * (1 - momentum)

with ``var' = var``, or ``var * N / (N - 1)`` when the unbiased option is on and ``N > 1``.

Normalization: ``y = (x - mean) * scale + offset`` with ``scale = invstd * w``, ``offset = b``.

The fused epilogue (``activation`` and ``residual`` of the functional core): ::

    z = (x - mean) * scale + offset + residual      (no residual: + 0)
    y = relu(z) = (z < 0 ? 0 : z)                   (no activation: y = z)

computed in the stats dtype and rounded once to the input dtype (``relu`` keeps NaN and -0,
as ``torch.relu``). Its backward needs no pre-activation copy: the mask is read from ``y``
itself, ``mask = y > 0`` (torch's ReLU backward also reads its output; it passes ``dy`` where
``y`` is NaN, this mask does not), and every backward formula below takes the masked
gradient ``g = (mask ? dy : 0)`` for ``dy``; the residual's gradient is ``dresidual = g``.

Backward all-reduce payload (float64, length ``2C + 2``; its slots are :class:`BackwardPayload`)::

    sum_dy      = sum dy              (C values; this rank's: its bias gradient)
    sum_dy_xmu  = sum dy * (x - mean) (C values; this rank's, times invstd: its weight gradient)
    tags        = (t, t^2)

and after the all-reduce, with ``xhat = (x - mean) * invstd``::

    dx = w * invstd * (dy - sum_dy / N - xhat * invstd * sum_dy_xmu / N)
       = (dy - mean_dy - (x - mean) * proj) * scale

which is the exact gradient of the global loss: uneven or empty ranks give the
same ``dx`` as one process holding the whole batch. In eval mode (fixed statistics)
``dx = dy * w * invstd``.

The tag ``t`` (an integer below ``2^20``, so every sum is exact in float64) numbers the
collective on its communicator. With ``R`` ranks, all ranks used the same tag exactly
when ``sum t = R t`` and ``sum t^2 = R t^2`` for this rank's ``t`` (equality in the
Cauchy-Schwarz inequality): a rank that fell out of step is seen by every rank in the
payload it already exchanges, with no extra collective and no host synchronization.

Every pass records what it found in ``stats.flags`` (a float of the statistics dtype,
so that it travels with the statistics and costs no allocation)::

    flags[0] (forward)  = NONFINITE * (some channel's mean or var is not finite)
                          + DESYNC * (the tags disagree)
    flags[1] (backward) = DESYNC * (the tags disagree)

The running statistics are left unchanged when either bit is set (per channel for
NONFINITE); the caller decides when to read the flags (at once on the CPU; on the GPU
without a host synchronization, later).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(dtype: Any) -> str:
    """``dtype.name``, cached: NumPy computes it in Python on every access (~3 us), and a
    layer call asks several times."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


NONFINITE = 1          # flag bits (see above)
DESYNC = 2


class ForwardPayload:
    """The slots of a forward all-reduce payload ``buf`` of ``channels`` channels (float64,
    length :meth:`size`), as views of it: this rank's values before the all-reduce, their sums
    over the ranks after it (see above). ``syncbn.cu`` indexes the same slots of its ``buf``."""

    __slots__ = ("buf", "sum_x", "m2_pivot", "count", "tags")

    def __init__(self, buf: Any, channels: int) -> None:
        c = channels
        self.buf = buf
        self.sum_x = buf[:c]                    # n m: the sum of x
        self.m2_pivot = buf[c:2 * c]            # M2 + n (m - K)^2: the sum of (x - K)^2
        self.count = buf[2 * c:2 * c + 1]       # n (one value: what dx reads as N)
        self.tags = buf[2 * c + 1:2 * c + 3]    # (t, t^2)

    @staticmethod
    def size(channels: int) -> int:
        return 2 * channels + 3

    @staticmethod
    def channels_of(size: int) -> int | None:
        """The channel count of a forward payload of ``size`` values; None when none has that size."""
        return (size - 3) // 2 if size >= 5 and size % 2 else None


class BackwardPayload:
    """The slots of a backward all-reduce payload ``buf`` of ``channels`` channels (float64,
    length :meth:`size`), as views of it (see above)."""

    __slots__ = ("buf", "sum_dy", "sum_dy_xmu", "tags")

    def __init__(self, buf: Any, channels: int) -> None:
        c = channels
        self.buf = buf
        self.sum_dy = buf[:c]
        self.sum_dy_xmu = buf[c:2 * c]
        self.tags = buf[2 * c:2 * c + 2]        # (t, t^2)

    @staticmethod
    def size(channels: int) -> int:
        return 2 * channels + 2

    @staticmethod
    def channels_of(size: int) -> int | None:
        """The channel count of a backward payload of ``size`` values; None when none has that size."""
        return (size - 2) // 2 if size >= 4 and size % 2 == 0 else None


class Stats:
    """Per-call statistics, ``[mean | invstd | scale | offset | flags[2]]`` in one array of
    length :meth:`size` (4C + 2), and the forward payload they came from.

    ``mean`` and ``invstd`` are what backward needs; ``scale`` (``invstd * w``) and ``offset``
    (``b``) are the folded affine; ``flags`` what the passes found (see above). The dtype is
    the stats dtype of the input. ``payload`` is the forward all-reduce buffer (float64,
    ``ForwardPayload.size(C)``), ``slots`` its :class:`ForwardPayload` views (made once: a
    statistics set is reused call after call).
    """

    __slots__ = ("data", "payload", "slots", "mean", "invstd", "scale", "offset", "flags")

    def __init__(self, data: Any, payload: Any, channels: int) -> None:
        self.data = data
        self.payload = payload
        self.slots = ForwardPayload(payload, channels)
        self.mean = data[:channels]
        self.invstd = data[channels:2 * channels]
        self.scale = data[2 * channels:3 * channels]
        self.offset = data[3 * channels:4 * channels]
        self.flags = data[4 * channels:]

    @staticmethod
    def size(channels: int) -> int:
        return 4 * channels + 2


class Backend:
    """Interface implemented by ``NumpyBackend`` and ``CupyBackend``.

    ``weight`` / ``bias`` (and their gradients) may be None (meaning 1 / 0, or no
    gradient wanted); parameters and running statistics have the layer's dtype;
    payload buffers are float64; ``dtype_name`` is the input's dtype name.
    """

    device: str
    xp: Any
    #: Largest number of rows A and of positions B (see the (A, C, B) view) a pass takes
    #: (None: no limit); the CUDA kernels walk them with 32-bit indices.
    max_extent: int | None = None

    #: Whether calls on this backend are planned per signature (``_planned``): the GPU backend.
    plans = False
    #: The device index that must be current for planned launches (GPU backends).
    index = 0
    #: The array types a planned call takes as they are (others take the full path).
    array_types: tuple = ()

    def __init__(self) -> None:
        self._scratch: dict[tuple, Any] = {}
        self._spare: dict[tuple, list[Stats]] = {}
        # Allocation on the planned path, where the device is known to be current.
        self.allocate = self.empty
        self.allocate_zeros = self.zeros
        #: Array types a planned call reads as they are: type -> (address getter, layout
        #: getter), C-level callables where possible (no Python frame); see :meth:`accept_array_type`.
        self.arrays: dict[type, tuple] = {}

    def accept_array_type(self, cls: type, pointer: Any, layout: Any) -> None:
        """Let planned calls take arrays of type ``cls`` (e.g. ``torch.Tensor``) as they are,
        reading their address with ``pointer(a)`` (an int) and their layout with ``layout(a)``
        (any hashable holding the strides and, on a GPU, the device index). Only for a caller that runs on the stream the arrays'
        producer uses (a planned call makes no DLPack exchange, so it adds no stream order):
        the torch adapter does, making torch's current stream CuPy's."""
        self.arrays[cls] = (pointer, layout)

    def report_ring(self) -> Any:
        """The ``_flags.ReportRing`` the kernels publish their flag bits to; None when the
        flags are read from ``stats.flags`` at once (the CPU)."""
        return None

    @staticmethod
    def address_of(a: Any) -> int:
        """The address of array ``a``'s first element."""
        return a.ctypes.data

    def scope(self) -> Any:
        """Context in which array creation and arithmetic land on this backend's device
        (CuPy allocates results on the *current* device, not the operands')."""
        return contextlib.nullcontext()

    def stream_key(self) -> Any:
        """Work queued under different keys may run concurrently (CUDA streams); one key on the CPU."""
        return 0

    def scratch(self, name: str, size: int, dtype: Any, zeroed: bool = False) -> Any:
        """A reused 1-D temporary of ``size`` elements: valid until the next request for
        ``name`` on this stream and thread (work on one stream runs in order). ``zeroed``:
        zero when allocated, and kept zero between uses by its users (kernel tickets)."""
        key = (name, self.stream_key(), threading.get_ident())
        buf = self._scratch.get(key)
        if buf is None or buf.size < size or buf.dtype != dtype:
            shape = (max(size, 1024),)
            buf = self.zeros(shape, dtype) if zeroed else self.empty(shape, dtype)
            self._scratch[key] = buf
        return buf[:size]

    def take_stats(self, *, channels: int, dtype: Any) -> Stats:
        """Statistics (and forward payload) for one forward, reused from :meth:`give_back`."""
        dtype = np.dtype(dtype)
        spare = self._spare.get((channels, dtype, self.stream_key()))
        if spare:
            return spare.pop()
        return Stats(self.empty((Stats.size(channels),), dtype),
                     self.empty((ForwardPayload.size(channels),), np.float64), channels)

    def give_back(self, stats: Stats) -> None:
        """``stats`` is no longer needed by the caller once queued work is done; work queued
        later on the current stream may reuse it."""
        spare = self._spare.setdefault((stats.mean.shape[0], stats.data.dtype, self.stream_key()), [])
        if len(spare) < 16:
            spare.append(stats)

    def import_array(self, x: Any, what: str) -> Any:
        """``x`` as an array of this backend, without copying when possible."""
        raise NotImplementedError

    def is_native(self, x: Any) -> bool:
        """Whether ``x`` already is an array of this backend."""
        raise NotImplementedError

    def zeros(self, shape: Any, dtype: Any) -> Any:
        return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape: Any, dtype: Any) -> Any:
        return self.xp.empty(shape, dtype=dtype)

    def contiguous(self, x: Any) -> Any:
        return self.xp.ascontiguousarray(x)

    def local_moments(self, *, x3: Any, pivot_state: Any, tag: int, buf: Any, pivot_payload: Any = None) -> None:
        """Write this rank's forward payload for ``x3`` into ``buf`` (see above) around the pivot
        K: the means of the reduced payload ``pivot_payload`` when given, else ``pivot_state``,
        else 0."""
        raise NotImplementedError

    def normalize_batch(self, *, x3: Any, buf: Any, tag: int, ranks: int, running_mean: Any, running_var: Any,
                        momentum: float, eps: float, unbiased: bool, weight: Any, bias: Any, stats: Stats,
                        y3: Any, pivot_state_out: Any = None, strict: bool = False, residual3: Any = None,
                        relu: bool = False) -> None:
        """From the reduced forward payload: ``stats`` (flags included), the running update when
        ``running_var`` is given, ``y3``, the normalized ``x3`` through the epilogue (plus
        ``residual3`` when given, then ReLU when ``relu``), and the batch's global means
        into ``pivot_state_out`` (the next pivot state; where N > 0, the ranks agree and finite).
        The running statistics and the pivot move per finite channel; with ``strict``, not at
        all when some channel is not finite."""
        raise NotImplementedError

    def normalize_fixed(self, *, x3: Any, running_mean: Any, running_var: Any, eps: float, weight: Any, bias: Any,
                        stats: Stats, y3: Any, residual3: Any = None, relu: bool = False) -> None:
        """``stats`` from the running statistics, and ``y3``, the normalized ``x3`` through the
        epilogue (as :meth:`normalize_batch`)."""
        raise NotImplementedError

    def backward_reduce(self, *, dy3: Any, x3: Any, stats: Stats, weight_grad: Any, bias_grad: Any,
                        tag: int, buf: Any, y3: Any = None) -> None:
        """Write this rank's backward payload (see above) into ``buf`` and add its shares to
        ``weight_grad`` / ``bias_grad`` (either may be None); with ``y3`` (the forward's output
        under ReLU), of the masked gradient ``g``."""
        raise NotImplementedError

    def backward_input(self, *, dy3: Any, x3: Any, stats: Stats, buf: Any, count: Any, tag: int, ranks: int,
                       dx3: Any, y3: Any = None, dresidual3: Any = None) -> None:
        """``dx`` into ``dx3`` from the reduced backward payload (and ``stats.flags[1]``), with
        ``count`` the reduced forward payload's count slot; ``count`` None means fixed (eval)
        statistics and ``buf`` is then unused. With ``y3`` (the forward's output under ReLU)
        of the masked gradient ``g``; ``g`` itself into ``dresidual3`` when given. ``dx3`` may
        be None (only ``dresidual3`` wanted: with ``count`` None, x is not read)."""
        raise NotImplementedError


_backends: dict[str, Backend] = {}
#: The backends built so far, by device: filled by ``_backend_factory.get_backend`` (the
#: factory sits above the backends it builds), changed only by :func:`swap_backend` otherwise.
backends = _backends


def swap_backend(device: str, backend: Backend | None) -> Backend | None:
    """Make ``backend`` the one of ``device`` (None: built anew on next use); returns the
    previous one. For tools that run the real host code on stand-in arrays."""
    previous = _backends.pop(device, None)
    if backend is not None:
        _backends[device] = backend
    return previous

