"""Stateless synchronized batch normalization: arrays in, arrays out.

The passes of :class:`cusyncbn.SyncBatchNorm` as two functions, for hand-written
training loops (as ``torch.nn.functional.batch_norm`` is for PyTorch): the layer
classes and the framework adapters are thin holders of state on top of them.

The maths, for channel ``c`` of the **global** batch (every element of that channel on
every rank of ``comm``, ``N`` of them)::

    mean  = sum(x) / N                      var = sum((x - mean)^2) / N   (biased)
    invstd = 1 / sqrt(var + epsilon)        y = (x - mean) * invstd * weight + bias
    running_mean = momentum * running_mean + (1 - momentum) * mean
    running_var  = momentum * running_var  + (1 - momentum) * var   (var * N / (N - 1) if unbiased)

    dbias   = sum(dy)                       dweight = sum(dy * (x - mean)) * invstd
    dx = weight * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))

where the sums of ``dbias`` / ``dweight`` run over this rank's elements (the sum over
ranks of these partial gradients is the full gradient, see
:func:`cusyncbn.allreduce_gradients`) and the means in ``dx`` over the global batch.
A training forward makes one all-reduce of ``2C + 3`` float64 values, a backward that
wants ``dx`` one of ``2C + 2``; eval makes none, and neither does a backward that wants
only the parameter gradients. Per-rank batches may be uneven or empty: the results are
those of one process holding the whole batch.

A fused epilogue (``activation="relu"`` and / or ``residual``) gives
``y = relu((x - mean) * invstd * weight + bias + residual)`` in the same passes (and the
same collectives), with no pre-activation copy: the backward reads the mask ``y > 0`` from
``y`` and uses ``g = dy * mask`` for ``dy`` in the formulas above; ``dresidual = g``.

Arrays may be NumPy or CuPy arrays or any DLPack producer (torch, JAX, Paddle); the
device is the input's (NumPy on the CPU, the CUDA kernels on a GPU), and every other
array must live there too. Results are NumPy or CuPy arrays.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from . import _debug, _flags, _planned, _watchdog
from ._backend import DESYNC, NONFINITE, Backend, BackwardPayload, ForwardPayload, Stats, backends, dtype_name
from ._backend_factory import get_backend
from ._comm import Communicator, SingleProcessComm, next_tag, peek_tag
from ._comm_factory import resolve_comm
from ._dlpack import device_of
from ._options import NONFINITE_MODES
from ._rules import check_activation, check_bool, check_epsilon, check_grad_output, check_input, check_momentum, \
    check_params, check_residual, channel_last, view3
from ._stacklevel import user_stacklevel

__all__ = ["BatchNormContext", "flush_reports", "sync_batch_norm", "sync_batch_norm_backward"]

_NDIMS = (2, 3, 4, 5)
_thread = _planned.thread_id
_pending = _flags.queue
_NO_ARRAYS: dict = {}
_note = _watchdog.current          # what the next collective is, for the watchdog's messages


class BatchNormContext:
    """What a forward keeps for its backward. Pass it to :func:`sync_batch_norm_backward`
    once; until then it holds the input and the statistics alive (drop it, or call
    :meth:`release`, when no backward will come)."""

    __slots__ = ("_backend", "_x3", "_shape", "_stats", "_count", "_comm", "_last", "_where", "_debug",
                 "_pdtype", "_done", "_affine", "_shape3", "_plan", "_entry", "_y", "_residual")

    def __init__(self, backend: Backend, x: Any, shape: tuple, shape3: tuple, stats: Stats, count: Any,
                 comm: Communicator, last: bool, where: str, debug: bool, pdtype: str | None,
                 affine: tuple[bool, bool], plan: Any = None, entry: Any = None, y: Any = None,
                 residual: bool = False) -> None:
        self._backend, self._x3, self._shape, self._stats, self._count = backend, x, shape, stats, count
        self._comm, self._last, self._where, self._debug, self._pdtype = comm, last, where, debug, pdtype
        self._affine, self._shape3, self._plan, self._entry = affine, shape3, plan, entry
        # The forward's output under ReLU (the backward's mask is y > 0), else None; whether
        # the forward added a residual (its backward then returns dresidual too).
        self._y, self._residual = y, residual
        self._done = False

    @property
    def batch_stats(self) -> bool:
        """Whether the forward normalized with the (synchronized) batch statistics."""
        return self._count is not None

    @property
    def consumed(self) -> bool:
        """True once backward has run or :meth:`release` was called."""
        return self._done

    @property
    def device(self) -> str:
        return self._backend.device

    @property
    def shape(self) -> tuple:
        """Shape of the forward's input (and of ``dy`` / ``dx``)."""
        return self._shape

    @property
    def residual(self) -> bool:
        """Whether the forward added a residual (its backward then returns ``dresidual`` too)."""
        return self._residual

    @property
    def mean(self) -> Any:
        """The per-channel mean used by the forward (global batch mean, or the running mean)."""
        return self._live().mean

    @property
    def invstd(self) -> Any:
        """The per-channel ``1 / sqrt(var + epsilon)`` used by the forward."""
        return self._live().invstd

    def _live(self) -> Stats:
        if self._done:
            raise RuntimeError(f"{self._where}: this context was already consumed by a backward (or released)")
        return self._stats

    def release(self) -> None:
        """Free what the forward kept, without a backward. Idempotent."""
        if not self._done:
            if self._entry is not None:
                stream = self._backend.current_stream()
                self._finish(stream.ptr == self._plan.stream and not stream.is_capturing())
                return
            self._done = True
            self._backend.give_back(self._stats)
            self._x3 = self._y = None

    def _finish(self, reuse: bool) -> None:
        """Release a planned forward's statistics set: back to its plan when ``reuse`` (released
        on the stream that wrote it, outside graph capture, so later work on that stream is
        ordered after its readers), else left to the allocator."""
        self._done = True
        if reuse:
            self._plan.recycle(self._entry)
        self._x3 = self._y = None

    def __repr__(self) -> str:
        state = "consumed" if self._done else "pending"
        return (f"BatchNormContext(shape={self._shape}, device={self.device!r}, "
                f"batch_stats={self.batch_stats}, {state})")


def flush_reports() -> None:
    """Report now what earlier passes found (non-finite statistics, ranks out of step).

    On the GPU each pass's findings reach the host asynchronously and are reported by a
    later call into cusyncbn; this waits for all of them (a host synchronization) and
    reports them at once, e.g. at the end of an epoch or before a checkpoint. On the CPU
    everything is reported by the pass itself and this does nothing.

    Raises:
        RuntimeError: a pass found the ranks' collectives out of step.
        FloatingPointError: non-finite statistics in a layer with ``nonfinite='raise'``.
    """
    _flags.flush()


def _backend_of(x: Any) -> Backend:
    if isinstance(x, np.ndarray):
        return get_backend("cpu")
    if not hasattr(x, "__dlpack_device__"):
        raise TypeError(f"x must be an array (NumPy, CuPy or a DLPack producer), got {type(x).__name__}")
    where = device_of(x)
    if where != "cpu" and not where.startswith("gpu:"):
        raise ValueError(f"x lives on {where}; cusyncbn runs on the CPU and on CUDA GPUs")
    return get_backend(where)


def _validated(where: str, check: Any, vote: Any) -> Any:
    """``check()``; with ``vote`` (a debug vote taking the error or None) all ranks first
    agree on whether every rank's check passed."""
    error: Exception | None = None
    value = None
    try:
        value = check()
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    if vote is not None:
        vote(error)
    if error is not None:
        raise error
    return value


# -- what the passes found ---------------------------------------------------------------

_warned: set = set()


def _report_forward(where: str, comm: Communicator, tag: int, nonfinite: str, stats: Stats | None = None) -> Any:
    """What a forward's report does with its code (``_flags``: bits, and the first non-finite
    channel from the GPU); ``stats``, on the CPU, names every non-finite channel."""
    def report(code: int) -> None:
        bits = code & 3
        if bits & DESYNC:
            raise RuntimeError(_desync_message(where, "forward", comm, tag))
        if bits & NONFINITE:
            if stats is not None:
                bad = np.flatnonzero(~(np.isfinite(stats.mean) & np.isfinite(stats.invstd))).tolist()
                channels = f"channel{'s' * (len(bad) > 1)} {', '.join(map(str, bad))}"
            else:
                channels = f"channel {(code >> 2) - 1} (the first)"
            kept = ("the running statistics of every channel were left unchanged" if nonfinite == "raise" else
                    "their running statistics were left unchanged")
            message = (f"{where}: the global batch statistics of {channels} are not finite (NaN/Inf in the input "
                       f"of some rank; reported on rank {comm.rank} of {comm.size}, collective #{tag}); {kept}")
            if nonfinite == "raise":
                raise FloatingPointError(message)
            if where not in _warned:
                _warned.add(where)
                warnings.warn(message + " (reported once per layer)", RuntimeWarning, stacklevel=user_stacklevel())
    return report


def _desync_message(where: str, what: str, comm: Communicator, tag: int) -> str:
    return (f"{where}: collectives out of step between ranks: this rank's collective #{tag} ({what}) was summed "
            f"with a different collective on another rank of {comm!r} (a rank skipped or added a forward or "
            "backward, e.g. after catching an exception); this step's results are wrong and the running "
            "statistics were left unchanged")


def _channels_of(x: Any, last: bool) -> int | None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    return int(shape[-1] if last else shape[1])


def sync_batch_norm(x: Any, running_mean: Any = None, running_var: Any = None, weight: Any = None,
                    bias: Any = None, *, training: bool = True, momentum: float = 0.9, epsilon: float = 1e-5,
                    data_format: str = "NCHW", comm: Any = None, unbiased_running_var: bool = False,
                    nonfinite: str = "warn", debug: bool = False, num_features: int | None = None,
                    device: str | None = None, name: str | None = None, out: Any = None,
                    activation: str | None = None, residual: Any = None) -> tuple[Any, BatchNormContext]:
    """Batch-normalize ``x`` over the global batch of ``comm``: one all-reduce in training.

    With a fused epilogue, ``y = act(BN(x) + residual)`` in the same kernels (ReLU after a
    batch norm, and the add of a residual block, without reading and writing the tensor
    again).

    Args:
        x: input of 2 to 5 dimensions, channels on axis 1 (channel-second formats) or last.
        running_mean, running_var: per-channel running statistics, updated in place in
            training (None: not tracked); required in eval (``training=False``).
        weight, bias: per-channel affine parameters (None: 1 and 0). All four per-channel
            arrays share one dtype, float32 or float64.
        training: True: normalize with the batch statistics synchronized over ``comm``;
            False: with the running statistics (no collective).
        momentum: ``running = running * momentum + batch * (1 - momentum)`` (Paddle's convention).
        epsilon: added to the variance.
        data_format: 'NC', 'NCL', 'NCHW', 'NCDHW' (channel second) or 'NLC', 'NHWC', 'NDHWC'.
        comm: None (every MPI rank when launched by MPI, else this process), an mpi4py
            communicator or a cusyncbn communicator.
        unbiased_running_var: update ``running_var`` with the unbiased variance (PyTorch's rule).
        nonfinite: 'warn' (once per ``name``) or 'raise' (``FloatingPointError``) when the
            global statistics of a channel are not finite; its running statistics are
            left unchanged either way. On a GPU this is reported by a later call.
        debug: before the collective, check with one extra small all-reduce that every rank
            makes the same collective and passed validation, so that an error on one rank
            is raised on every rank instead of leaving the others waiting; with debug an
            eval forward makes this check too (it reads the result on the host).
        num_features: the expected channel count (None: any).
        device: 'cpu' or 'gpu:N' where ``x`` must live (None: wherever it lives). On a GPU,
            giving it lets repeated calls take their planned path (``cusyncbn._planned``).
        name: used in messages.
        out: where to write ``y`` (an array of the backend, shape and dtype of ``x``,
            C-contiguous, not the residual); None: a new array. Framework adapters pass their
            own tensors.
        activation: None (``y = BN(x) + residual``) or ``"relu"`` (``y = max(., 0)``; NaN
            stays NaN, as ``torch.relu``). In training and eval alike. Under ReLU the
            context keeps ``y`` (not a copy) and its backward reads the mask ``y > 0`` from
            it: **do not modify y in place** between this forward and its backward (as with
            ``torch.relu``, whose backward also reads its output: ``threshold_backward``).
        residual: None, or an array added before the activation: the shape, dtype and
            data format of ``x`` (any strides: a non-contiguous one is copied first, as
            ``x`` is), on ``x``'s device. Its gradient is the backward's fourth result.

    Returns:
        ``(y, ctx)``: ``y`` with the shape and dtype of ``x`` (``out`` when given); ``ctx``
        for the backward.

    Raises:
        TypeError / ValueError: bad input, arrays or options (before any collective), e.g.
            an ``activation`` other than None or ``"relu"`` (ValueError), a residual of
            another shape (ValueError) or dtype (TypeError) than ``x``.
        RuntimeError: the ranks' collectives are out of step (every rank raises).

    Example:
        >>> import numpy as np
        >>> from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward
        >>> x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)          # (N, C, L)
        >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
        >>> y, ctx = sync_batch_norm(x, rm, rv, data_format="NCL")
        >>> [round(float(v), 6) for v in y.mean(axis=(0, 2))]
        [0.0, 0.0]
        >>> dx, dw, db = sync_batch_norm_backward(ctx, np.ones_like(y))
        >>> z = np.ones_like(x)                                            # a residual
        >>> y, ctx = sync_batch_norm(x, rm, rv, data_format="NCL", activation="relu", residual=z)
        >>> bool((y >= 0).all())
        True
        >>> dx, dw, db, dz = sync_batch_norm_backward(ctx, np.ones_like(y))
        >>> bool((dz == (y > 0)).all())                                  # dresidual = dy * (y > 0)
        True
    """
    if _pending:
        _flags.poll()
    backend = backends.get(device) if device is not None and debug is False else None
    arrays = backend.arrays if backend is not None and backend.plans else _NO_ARRAYS
    x_getters = arrays.get(type(x))
    out_getters = None if out is None else arrays.get(type(out))
    residual_getters = None if residual is None else arrays.get(type(residual))
    key = None
    if x_getters is not None and (out is None or out_getters is not None) and \
            (residual is None or residual_getters is not None) and (activation is None or type(activation) is str):
        # The planned path (see _planned): the signature, then only what depends on the data.
        stream = backend.current_stream()
        key = (type(x), tuple(x.shape), x_getters[1](x), x.dtype, training, momentum, epsilon, data_format, id(comm),
               unbiased_running_var, nonfinite, num_features, device, name, id(running_mean), id(running_var),
               id(weight), id(bias), None if out is None else (type(out), tuple(out.shape), out_getters[1](out), out.dtype),
               activation, None if residual is None else (type(residual), tuple(residual.shape),
                                                          residual_getters[1](residual), residual.dtype),
               _thread(), stream.ptr)
        plan = _planned.FORWARD.get(key)
        if plan is not None and backend.current_device() == backend.index and not stream.is_capturing():
            xp = x_getters[0](x)
            rp = 0 if residual is None else residual_getters[0](residual)
            if xp & 15 == plan.x_align and rp & 15 == plan.r_align:
                y = backend.allocate(plan.x_shape, plan.x_dtype) if out is None else out
                yp = backend.pointer(y) if out is None else out_getters[0](out)
                if yp & 15 == plan.y_align:
                    entry = plan.free.pop() if plan.free else plan.entry()
                    n_args = entry.normalize_args
                    n_args.cells[plan.nx] = xp
                    n_args.cells[plan.ny] = yp
                    n_args.cells[plan.nresidual] = rp
                    count = None
                    if plan.training:
                        tag = next_tag(plan.comm)
                        m_args = entry.moments_args
                        m_args.cells[plan.mx] = xp
                        m_args.doubles[plan.mtag] = n_args.doubles[plan.ntag] = tag
                        entry.moments()
                        if entry.allreduce is not None:
                            _note.collective = (plan.where, "forward", tag)
                            entry.allreduce()
                        n_args.cells[plan.nreport], n_args.cells[plan.nseq] = _flags.claim(
                            plan.ring, _report_forward(plan.where, plan.comm, tag, plan.nonfinite),
                            (plan.where, "forward", plan.comm, tag))
                        count = entry.count
                    entry.normalize()
                    return y, BatchNormContext(backend, x, plan.x_shape, plan.x3_shape, entry.stats, count,
                                               plan.comm_or_self, plan.last, plan.where, False, plan.pdtype,
                                               plan.affine, plan, entry, y if plan.relu else None,
                                               plan.residual)
    where = name or "sync_batch_norm"
    last = channel_last(data_format)
    training = check_bool(training, "training", where)
    debug = check_bool(debug, "debug", where)
    unbiased = check_bool(unbiased_running_var, "unbiased_running_var", where)
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"{where}: nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    given = x
    backend = get_backend(device) if device is not None else _backend_of(x)
    comm = resolve_comm(comm, backend.device) if (training or debug) else None
    tag = next_tag(comm) if training else 0

    def check() -> tuple:
        momentum_ = check_momentum(momentum, where)
        epsilon_ = check_epsilon(epsilon, where)
        relu_ = check_activation(activation, where)
        xa = check_input(backend, x, num_features, last, _NDIMS, data_format, where)
        c = _channels_of(xa, last)
        params = check_params(backend, c, where, running_mean=running_mean, running_var=running_var,
                              weight=weight, bias=bias)
        if not training and (params["running_mean"] is None or params["running_var"] is None):
            raise ValueError(f"{where}: eval (training=False) needs running_mean and running_var")
        if (params["running_mean"] is None) != (params["running_var"] is None):
            raise ValueError(f"{where}: give both running_mean and running_var, or neither")
        residual_a = None if residual is None else check_residual(backend, residual, xa, where)
        out_a = None
        if out is not None:
            out_a = backend.import_array(out, "out")
            _check_out(backend, out_a, xa, "out", where)
            if residual_a is not None and _same_memory(backend, out_a, residual_a):
                raise ValueError(f"{where}: out must not be the residual (y is written while the residual is read)")
        return xa, params, momentum_, epsilon_, out_a, relu_, residual_a

    vote = None
    if debug and comm.size > 1:
        def vote(error: Exception | None) -> None:
            row = _debug.record(tag if training else peek_tag(comm), False, _channels_of(x, last) or 0,
                                _dtype_label(running_mean, running_var, weight, bias), training)
            _debug.agree(comm, backend.xp, where, row, error)
    x, params, momentum, epsilon, out_array, relu, residual_array = _validated(where, check, vote)
    c = _channels_of(x, last)
    x3 = view3(x, c, last)
    residual3 = None if residual_array is None else view3(residual_array, c, last)
    stats = backend.take_stats(channels=c, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    rm, rv, w, b = params["running_mean"], params["running_var"], params["weight"], params["bias"]
    y3 = backend.empty(x3.shape, x.dtype) if out is None else view3(out_array, c, last)
    ring = backend.report_ring()
    capturing = ring is not None and backend.capturing()
    count = None
    pivot_state = None
    if training:
        buf = stats.payload
        pivot_state, known = _pivot_state(backend, rm, c)
        if known:                              # one all-reduce around the previous batch's mean
            backend.local_moments(x3=x3, pivot_state=pivot_state, tag=tag, buf=buf)
            _note.collective = (where, "forward", tag)
            comm.allreduce(buf)
        else:                                  # no pivot yet: a first all-reduce finds the mean
            first = backend.scratch("first forward payload", ForwardPayload.size(c), np.float64)
            backend.local_moments(x3=x3, pivot_state=None, tag=tag, buf=first)
            _note.collective = (where, "forward", tag)
            comm.allreduce(first)
            tag = next_tag(comm)
            backend.local_moments(x3=x3, pivot_state=None, tag=tag, buf=buf, pivot_payload=first)
            _note.collective = (where, "forward", tag)
            comm.allreduce(buf)
        slot: dict = {}                        # host flags: none; device flags: a report slot
        if ring is not None:
            report = _report_forward(where, comm, tag, nonfinite)
            slot["report"], slot["seq"] = (0, 0) if capturing else _flags.claim(ring, report,
                                                                                (where, "forward", comm, tag))
        backend.normalize_batch(x3=x3, buf=buf, tag=tag, ranks=comm.size, running_mean=rm, running_var=rv,
                                momentum=momentum, eps=epsilon, unbiased=unbiased, weight=w, bias=b, stats=stats,
                                y3=y3, pivot_state_out=pivot_state, strict=nonfinite == "raise", residual3=residual3,
                                relu=relu, **slot)
        if ring is None:                       # host flags: reported at once, on every rank
            _flags.watch(stats.flags, _report_forward(where, comm, tag, nonfinite, stats))
        count = stats.slots.count
    else:
        backend.normalize_fixed(x3=x3, running_mean=rm, running_var=rv, eps=epsilon, weight=w, bias=b, stats=stats,
                                y3=y3, residual3=residual3, relu=relu)
    plan = None
    if (_planned.enabled and key is not None and not capturing and (pivot_state is not None or not training)
            and _aliases(backend, x_getters, given, x)
            and (type(given) in backend.array_types if out is None else _aliases(backend, out_getters, out, out_array))
            and (residual is None or _aliases(backend, residual_getters, residual, residual_array))
            # the key holds the given per-channel arrays' identities, the plan the validated ones
            and rm is running_mean and rv is running_var and w is weight and b is bias):
        plan = _planned.ForwardPlan(
            backend, comm, training, tuple(x.shape), x3.shape, x.dtype, stats.data.dtype, x3, y3, params,
            momentum, epsilon, unbiased, where, last, params["dtype"], (w is not None, b is not None), nonfinite,
            pivot_state, residual3, relu)
        _planned.remember(key, plan)
    ctx = BatchNormContext(backend, x3, tuple(x.shape), x3.shape, stats, count, comm or SingleProcessComm(), last,
                           where, debug, params["dtype"], (w is not None, b is not None), plan, None,
                           y3 if relu else None, residual3 is not None)
    return (y3.reshape(x.shape) if out is None else out), ctx


#: Pivot states (see ``_backend.py``, "The pivot"), by the identity of the running mean they
#: go with: ``id -> (running mean, pivot state)`` (the running mean held, so that its id stays
#: its own).
_PIVOT_STATES: dict = {}
_MAX_PIVOT_STATES = 4096


def _pivot_state(backend: Backend, running_mean: Any, channels: int) -> tuple[Any, bool]:
    """``(pivot state, known)`` for a training forward with ``running_mean``: its float64 pivot
    state on the backend's device, and whether it holds a previous batch's means (False on
    the first call, and always ``(None, False)`` without running statistics)."""
    if running_mean is None:
        return None, False
    entry = _PIVOT_STATES.get(id(running_mean))
    if entry is not None and entry[0] is running_mean and entry[1].shape[0] == channels:
        return entry[1], True
    if len(_PIVOT_STATES) >= _MAX_PIVOT_STATES:
        _PIVOT_STATES.pop(next(iter(_PIVOT_STATES)))
    pivot_state = backend.zeros((channels,), np.float64)
    _PIVOT_STATES[id(running_mean)] = (running_mean, pivot_state)
    return pivot_state, False


def _aliases(backend: Backend, getters: tuple, given: Any, array: Any) -> bool:
    """Whether the validated ``array`` is ``given`` itself, or a view of exactly its memory
    (``given`` a type the planned path reads through ``getters``, e.g. a torch tensor)."""
    return given is array or (getters[0](given) == backend.address_of(array) and
                              tuple(given.shape) == tuple(array.shape) and bool(array.flags.c_contiguous))


def _check_out(backend: Backend, out: Any, like: Any, what: str, where: str, shape: tuple | None = None) -> None:
    """``out`` (imported) must be a C-contiguous array of ``backend`` with ``like``'s dtype and
    ``shape`` (default: ``like``'s)."""
    shape = tuple(like.shape) if shape is None else tuple(shape)
    if not backend.is_native(out):
        raise TypeError(f"{where}: {what} must be an array of the {backend.device} backend "
                        f"({type(backend.xp.empty(0)).__module__}), got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != like.dtype:
        raise ValueError(f"{where}: {what} has shape {tuple(out.shape)} and dtype {out.dtype}, expected "
                         f"{shape} and {like.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{where}: {what} must be C-contiguous")
    if out is like:
        raise ValueError(f"{where}: {what} must not be the input itself")


def _same_memory(backend: Backend, a: Any, b: Any) -> bool:
    """Whether arrays ``a`` and ``b`` of ``backend`` (of one shape) start at one address."""
    return a.size > 0 and backend.address_of(a) == backend.address_of(b)


def _dtype_label(*arrays: Any) -> str | None:
    """'float32' / 'float64' for the first array given (of any framework), else None."""
    for a in arrays:
        if a is not None:
            text = str(getattr(a, "dtype", ""))
            return "float64" if "float64" in text else "float32" if "float32" in text else text or None
    return None


def sync_batch_norm_backward(ctx: BatchNormContext, dy: Any, *, input_grad: bool = True, weight_grad: bool = True,
                             bias_grad: bool = True, weight_grad_out: Any = None, bias_grad_out: Any = None,
                             retain: bool = False, input_grad_out: Any = None, residual_grad: bool = True,
                             residual_grad_out: Any = None) -> tuple[Any, ...]:
    """Gradients of the forward that made ``ctx``, given ``dy``: one all-reduce when ``dx``
    is wanted after a training forward, none otherwise.

    After a forward with ``activation="relu"`` every gradient is that of the masked
    ``g = dy * (y > 0)``, the mask read from the forward's ``y`` (kept by ``ctx``: it must
    not have been modified in place since; ``y > 0`` is false where ``y`` is NaN, where
    torch's ReLU backward passes ``dy``). After a forward with a ``residual`` it also returns
    ``dresidual = g`` (``dy`` itself without activation, written to a new array).

    Args:
        ctx: from :func:`sync_batch_norm` (each context takes one backward).
        dy: gradient of the loss w.r.t. ``y`` (same shape; cast to ``y``'s dtype).
        input_grad: compute ``dx``. False makes no collective (every rank must agree).
        weight_grad, bias_grad: compute this rank's share of ``dweight`` / ``dbias``.
        weight_grad_out, bias_grad_out: arrays to **add** the shares into (e.g. a
            parameter's ``.grad``) instead of allocating new ones; used whatever
            ``weight_grad`` / ``bias_grad`` say.
        retain: keep ``ctx`` for another backward (as ``retain_graph`` in autograd
            frameworks); by default it is released.
        input_grad_out: where to write ``dx`` (an array of the backend with the input's
            shape and dtype, C-contiguous); None: a new array.
        residual_grad: compute ``dresidual`` (only after a forward with a residual; no
            collective either way).
        residual_grad_out: where to write ``dresidual`` (as ``input_grad_out``, another
            array than it); only after a forward with a residual.

    Returns:
        ``(dx, dweight, dbias)``, and ``(dx, dweight, dbias, dresidual)`` after a forward
        with a residual (``dresidual``: the input's shape and dtype); each None when not
        wanted (or, for the parameter gradients, when the forward had no such parameter
        and no ``*_out`` is given).

    Raises:
        RuntimeError: ``ctx`` was already used; the ranks' collectives are out of step.
        TypeError / ValueError: ``dy`` (or an output) does not match the forward's input;
            ``residual_grad_out`` after a forward without a residual (ValueError).
    """
    if _pending:
        _flags.poll()
    plan = ctx._plan if type(ctx) is BatchNormContext else None
    key = None
    given = dy
    arrays = plan.backend.arrays if plan is not None else _NO_ARRAYS
    dy_get = arrays.get(type(dy))
    dx_get = None if input_grad_out is None else arrays.get(type(input_grad_out))
    wg_get = None if weight_grad_out is None else arrays.get(type(weight_grad_out))
    bg_get = None if bias_grad_out is None else arrays.get(type(bias_grad_out))
    rg_get = None if residual_grad_out is None else arrays.get(type(residual_grad_out))
    if dy_get is not None and not ctx._done and (residual_grad_out is None or rg_get is not None) and \
            (input_grad_out is None or dx_get is not None) and \
            (weight_grad_out is None or wg_get is not None) and (bias_grad_out is None or bg_get is not None):
        backend = plan.backend
        stream = backend.current_stream()
        key = (type(dy), tuple(dy.shape), dy_get[1](dy), dy.dtype, input_grad, weight_grad, bias_grad, retain,
               None if wg_get is None else (type(weight_grad_out), tuple(weight_grad_out.shape), wg_get[1](weight_grad_out),
                                            weight_grad_out.dtype),
               None if bg_get is None else (type(bias_grad_out), tuple(bias_grad_out.shape), bg_get[1](bias_grad_out),
                                            bias_grad_out.dtype),
               None if dx_get is None else (type(input_grad_out), tuple(input_grad_out.shape), dx_get[1](input_grad_out),
                                            input_grad_out.dtype),
               residual_grad, None if rg_get is None else (type(residual_grad_out), tuple(residual_grad_out.shape),
                                                           rg_get[1](residual_grad_out), residual_grad_out.dtype),
               ctx._count is None, _thread(), stream.ptr)
        bplan = plan.backward.get(key)
        if bplan is not None and backend.current_device() == backend.index and not stream.is_capturing():
            pointer = backend.pointer
            dyp, xp = dy_get[0](dy), arrays[type(ctx._x3)][0](ctx._x3)
            # dx and dresidual: the given outputs, or new arrays (when wanted).
            dx = None if not input_grad else input_grad_out if input_grad_out is not None else \
                backend.allocate(plan.x_shape, plan.x_dtype)
            dxp = 0 if dx is None else pointer(dx) if input_grad_out is None else dx_get[0](dx)
            dresidual = None if not bplan.dresidual else residual_grad_out if residual_grad_out is not None else \
                backend.allocate(plan.x_shape, plan.x_dtype)
            drp = 0 if dresidual is None else pointer(dresidual) if residual_grad_out is None else rg_get[0](dresidual)
            yp = 0 if ctx._y is None else arrays[type(ctx._y)][0](ctx._y)
            if dyp & 15 == bplan.dy_align and xp & 15 == bplan.x_align and dxp & 15 == bplan.dx_align and \
                    yp & 15 == bplan.y_align and drp & 15 == bplan.dr_align:
                stats_p = pointer(ctx._stats.data)
                wg = weight_grad_out if weight_grad_out is not None else \
                    backend.allocate_zeros(bplan.grad_shape, bplan.pdtype) if bplan.new_wg else None
                bg = bias_grad_out if bias_grad_out is not None else \
                    backend.allocate_zeros(bplan.grad_shape, bplan.pdtype) if bplan.new_bg else None
                tag = next_tag(ctx._comm) if bplan.collective else 0
                if bplan.reduce is not None:
                    cells = bplan.reduce_args.cells
                    cells[bplan.rdy], cells[bplan.rx], cells[bplan.rstats], cells[bplan.rmask] = dyp, xp, stats_p, yp
                    cells[bplan.rwg] = 0 if wg is None else pointer(wg) if wg_get is None else wg_get[0](wg)
                    cells[bplan.rbg] = 0 if bg is None else pointer(bg) if bg_get is None else bg_get[0](bg)
                    bplan.reduce_args.doubles[bplan.rtag] = tag
                    bplan.reduce()
                    if bplan.allreduce is not None:
                        _note.collective = (ctx._where, "backward", tag)
                        bplan.allreduce()
                if bplan.dx is not None:
                    cells = bplan.dx_args.cells
                    cells[bplan.ddy], cells[bplan.dxx], cells[bplan.ddx], cells[bplan.dstats] = dyp, xp, dxp, stats_p
                    cells[bplan.dmask], cells[bplan.ddresidual] = yp, drp
                    if bplan.collective:
                        cells[bplan.dcount] = pointer(ctx._count)
                        bplan.dx_args.doubles[bplan.dtag] = tag
                        cells[bplan.dreport], cells[bplan.dseq] = _flags.claim(
                            bplan.ring, _backward_report(ctx._where, ctx._comm, tag),
                            (ctx._where, "backward", ctx._comm, tag))
                    bplan.dx()
                if not retain:
                    ctx._finish(stream.ptr == plan.stream)        # not capturing: checked above
                return (dx, wg, bg, dresidual) if plan.residual else (dx, wg, bg)
    if not isinstance(ctx, BatchNormContext):
        raise TypeError(f"ctx must be the BatchNormContext returned by sync_batch_norm, got {type(ctx).__name__}")
    where = ctx._where
    input_grad = check_bool(input_grad, "input_grad", where)
    residual_grad = check_bool(residual_grad, "residual_grad", where) and ctx._residual
    comm, backend = ctx._comm, ctx._backend
    collective = input_grad and ctx.batch_stats
    tag = next_tag(comm) if collective else 0
    c = ctx._shape3[1]
    # The forward's input as this backend's array (a planned forward keeps what it was given).
    x_array = ctx._x3 if ctx._done or backend.is_native(ctx._x3) else backend.import_array(ctx._x3, "x")

    def check() -> tuple:
        if ctx._done:
            raise RuntimeError(f"{where}: this forward was already back-propagated (each context takes one "
                               "backward)")
        dya = check_grad_output(backend, dy, ctx._shape, x_array.dtype, where)
        pdtype = ctx._pdtype or "float32"
        wg = _grad_slot(backend, weight_grad, weight_grad_out, ctx._affine[0], c, pdtype, "weight_grad_out", where)
        bg = _grad_slot(backend, bias_grad, bias_grad_out, ctx._affine[1], c, pdtype, "bias_grad_out", where)
        dx_a = None
        if input_grad and input_grad_out is not None:
            dx_a = backend.import_array(input_grad_out, "input_grad_out")
            _check_out(backend, dx_a, x_array, "input_grad_out", where, ctx._shape)
        if residual_grad_out is not None and not ctx._residual:
            raise ValueError(f"{where}: residual_grad_out was given, but the forward had no residual")
        dresidual_a = None
        if residual_grad and residual_grad_out is not None:
            dresidual_a = backend.import_array(residual_grad_out, "residual_grad_out")
            _check_out(backend, dresidual_a, x_array, "residual_grad_out", where, ctx._shape)
            if dx_a is not None and _same_memory(backend, dx_a, dresidual_a):
                raise ValueError(f"{where}: residual_grad_out and input_grad_out must be different arrays")
        return dya, wg, bg, dx_a, dresidual_a

    vote = None
    if ctx._debug and collective and comm.size > 1:
        def vote(error: Exception | None) -> None:
            _debug.agree(comm, backend.xp, where, _debug.record(tag, True, c, ctx._pdtype, True), error)
    dy, wg, bg, dx_array, dresidual_array = _validated(where, check, vote)
    dy3 = view3(dy, c, ctx._last)
    stats, x3 = ctx._stats, x_array.reshape(ctx._shape3)
    y3 = None                                  # under ReLU: the forward's output, for the mask
    if ctx._y is not None:
        y3 = (ctx._y if backend.is_native(ctx._y) else backend.import_array(ctx._y, "y")).reshape(ctx._shape3)
    dx = dx3 = dresidual = dresidual3 = None
    buf = None
    reduce = collective or wg is not None or bg is not None
    if reduce:
        buf = backend.scratch("backward payload", BackwardPayload.size(c), np.float64)
        backend.backward_reduce(dy3=dy3, x3=x3, stats=stats, weight_grad=wg, bias_grad=bg, tag=tag, buf=buf, y3=y3)
        if collective:
            _note.collective = (where, "backward", tag)
            comm.allreduce(buf)
    ring = backend.report_ring()
    capturing = ring is not None and backend.capturing()
    if input_grad or residual_grad:
        if input_grad:
            dx3 = backend.empty(x3.shape, x3.dtype) if input_grad_out is None else view3(dx_array, c, ctx._last)
        if residual_grad:
            dresidual3 = backend.empty(x3.shape, x3.dtype) if dresidual_array is None else \
                view3(dresidual_array, c, ctx._last)
        slot = {}                              # device flags of a collective: a report slot
        if collective and ring is not None:
            slot["report"], slot["seq"] = (0, 0) if capturing else _flags.claim(
                ring, _backward_report(where, comm, tag), (where, "backward", comm, tag))
        # Fixed (eval) statistics make no collective: buf and count None, dx = g * scale; so
        # does dresidual alone (dx3 None: x is not read).
        backend.backward_input(dy3=dy3, x3=x3, stats=stats, buf=buf if collective else None,
                               count=ctx._count if collective else None, tag=tag, ranks=comm.size, dx3=dx3, y3=y3,
                               dresidual3=dresidual3, **slot)
        if collective and ring is None:
            _flags.watch(stats.flags[1:], _backward_report(where, comm, tag))
        if input_grad:
            dx = dx3.reshape(ctx._shape) if input_grad_out is None else input_grad_out
        if residual_grad:
            dresidual = dresidual3.reshape(ctx._shape) if residual_grad_out is None else residual_grad_out
    if key is not None and not capturing and _aliases(backend, dy_get, given, dy) and (not input_grad or (
            type(given) in backend.array_types if input_grad_out is None
            else _aliases(backend, dx_get, input_grad_out, dx_array))) and \
            (wg is None or wg_get is None or _aliases(backend, wg_get, weight_grad_out, wg)) and \
            (bg is None or bg_get is None or _aliases(backend, bg_get, bias_grad_out, bg)) and (not residual_grad or (
                type(given) in backend.array_types if residual_grad_out is None
                else _aliases(backend, rg_get, residual_grad_out, dresidual_array))):
        plan.backward[key] = _planned.BackwardPlan(
            backend, ctx._comm, collective, dy3, x3, dx3, wg, bg, buf, ring, reduce, ctx._pdtype or "float32",
            new_wg=weight_grad_out is None and wg is not None, new_bg=bias_grad_out is None and bg is not None,
            y3=y3, dresidual3=dresidual3)
    if not check_bool(retain, "retain", where):
        ctx.release()
    grads = (dx, weight_grad_out if weight_grad_out is not None else wg,
             bias_grad_out if bias_grad_out is not None else bg)
    return grads + (dresidual,) if ctx._residual else grads


def _backward_report(where: str, comm: Communicator, tag: int) -> Any:
    def report(code: int) -> None:
        if code & DESYNC:
            raise RuntimeError(_desync_message(where, "backward", comm, tag))
    return report


def _grad_slot(backend: Backend, wanted: bool, out: Any, exists: bool, channels: int, pdtype: str, what: str,
               where: str) -> Any:
    """Where a parameter gradient accumulates: ``out``, fresh zeros, or None (not wanted, or
    the forward had no such parameter)."""
    if out is not None:
        arr = check_params(backend, channels, where, **{what: out})[what]
        if dtype_name(arr.dtype) != pdtype:
            raise TypeError(f"{where}: {what} must have the parameters' dtype {pdtype}, got {arr.dtype}")
        return arr
    if not check_bool(wanted, what.replace("_out", ""), where) or not exists:
        return None
    return backend.zeros((channels,), pdtype)
