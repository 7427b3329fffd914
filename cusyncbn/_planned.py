"""Passes planned per call signature: what a repeated GPU call does on the host.

The first call of :func:`cusyncbn.functional.sync_batch_norm` (or of its backward) with a
given *signature* takes the full path: every check, with its messages, before any
collective. When that call succeeded on a GPU backend, it leaves a plan here for its
signature; a later call with the same signature skips everything that depends only on
the signature and does what depends on the data: the collective tag, the data pointers
written into pre-packed kernel arguments (``_launch.Arguments``), the launches, the
all-reduce, the report slot (``_flags``).

Signature of a forward (the key of :data:`FORWARD`): the input's type, shape, strides
and dtype; the options (training, momentum, epsilon, data format, unbiased, nonfinite,
num_features, device, name); the identities of the communicator and of the running
statistics, weight and bias (the plan holds them, so an identity cannot be reused by
another array while the plan lives); the output's type, shape, strides and dtype (or
None); the epilogue: the activation and the residual's type, shape, strides and dtype (or
None); the thread; the current stream. Per call it checks the pointers' alignment class
(the vector width of the kernels depends on it), that the device is current and that
the stream is not capturing a CUDA graph; any mismatch takes the full path. Debug mode
and host (NumPy) arrays always take the full path.

A backward's plan hangs off its forward's plan, keyed by ``dy``'s type, shape, strides
and dtype, the wanted gradients (``dresidual`` included) and the gradient outputs'
types/shapes/dtypes (their pointers are written per call: a layer's gradient arrays may be
replaced between steps); under ReLU the forward's ``y`` pointer is written per call too.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from ._backend import Stats
from ._comm import SingleProcessComm, prepared_allreduce
from ._launch import backward_arguments, dx_arguments, moments_arguments, normalize_arguments

#: Forward plans by signature (see the module docstring); bounded, oldest dropped first.
FORWARD: dict = {}
#: False: no new plans are made (every call takes the full path; for comparisons and debugging).
enabled = True
MAX_PLANS = 1024        # a plan holds its parameter arrays alive (their ids are in its key)
MAX_ENTRIES = 32            # statistics sets a plan keeps for forwards awaiting their backward


class Entry:
    """One forward's statistics and payload, with the argument packs and launches that point
    at them (the pointers to the input and output are written per call)."""

    __slots__ = ("stats", "moments_args", "normalize_args", "moments", "normalize", "allreduce", "count")

    def __init__(self, stats: Stats, moments_args: Any, normalize_args: Any, moments: Callable,
                 normalize: Callable, allreduce: Callable | None, count: Any) -> None:
        self.stats, self.moments_args, self.normalize_args = stats, moments_args, normalize_args
        self.moments, self.normalize, self.allreduce, self.count = moments, normalize, allreduce, count


class ForwardPlan:
    """The planned forward of one signature, built from a forward that passed the full path
    (its validated arrays ``x3``, ``y3`` and ``params``). The ``n*`` / ``m*`` attributes are the
    normalize / moments argument cells written per call."""

    def __init__(self, backend: Any, comm: Any, training: bool, x_shape: tuple, x3_shape: tuple, x_dtype: Any,
                 stats_dtype: Any, x3: Any, y3: Any, params: dict, momentum: float, epsilon: float,
                 unbiased: bool, where: str, last: bool, pdtype: str | None, affine: tuple,
                 nonfinite: str, pivot_state: Any, residual3: Any = None, relu: bool = False) -> None:
        self.backend, self.comm, self.training = backend, comm, training
        self.comm_or_self = comm if comm is not None else SingleProcessComm()
        self.x_shape, self.x3_shape, self.x_dtype, self.stats_dtype = x_shape, x3_shape, x_dtype, stats_dtype
        self.where, self.last, self.pdtype, self.affine, self.nonfinite = where, last, pdtype, affine, nonfinite
        # The epilogue: ReLU (the context then keeps y for the backward's mask), and whether a
        # residual is added (its pointer written per call; 0 without one, as is its alignment).
        self.relu, self.residual = relu, residual3 is not None
        address = backend.address_of
        self.x_align, self.y_align = address(x3) & 15, address(y3) & 15
        self.r_align = 0 if residual3 is None else address(residual3) & 15
        rm, rv, w, b = params["running_mean"], params["running_var"], params["weight"], params["bias"]
        self.keep = (rm, rv, w, b, pivot_state)    # the arrays whose identities are in the key, the pivot state
        pname = pdtype or "float32"
        self.stream = backend.current_stream().ptr
        self._normalize_plan = backend.launch_plan("normalize", x3, (x3, y3, residual3), pname)
        # The normalize arguments every call of the signature shares (builder keywords; the rest
        # are per entry or per call).
        self._normalize_given = {name: (None if arr is None else address(arr)) for name, arr in
                                 (("running_mean", rm), ("running_var", rv), ("weight", w), ("bias", b))}
        self._normalize_given.update(eps=epsilon, residual=None, relu=relu)
        self._moments_plan = self._pivot_state = None
        if training:                               # (a pivot state exists: one all-reduce per call)
            self._moments_plan = backend.launch_plan("moments", x3, (x3,), "float32")
            self._pivot_state = address(pivot_state)
            self._normalize_given.update(ranks=self.comm_or_self.size, momentum=momentum, unbiased=unbiased,
                                         pivot_state_out=self._pivot_state, strict=nonfinite == "raise")
        self.ring = backend.report_ring() if training else None
        self.free: list[Entry] = []
        self.backward: dict = {}
        n_index = self._normalize_plan.args.index
        self.nx, self.ny, self.ntag, self.nresidual = n_index["x"], n_index["y"], n_index["tag"], n_index["residual"]
        self.nreport, self.nseq = n_index["report"], n_index["seq"]
        if training:
            m_index = self._moments_plan.args.index
            self.mx, self.mtag = m_index["x"], m_index["tag"]

    def entry(self) -> Entry:
        """A free statistics set, or a new one (two allocations: the statistics and the payload)."""
        if self.free:
            return self.free.pop()
        backend = self.backend
        c = self.x3_shape[1]
        stats = backend.take_stats(channels=c, dtype=self.stats_dtype)
        address = backend.address_of
        n_args = self._normalize_plan.arguments()
        m_args = moments = allreduce = count = None
        # x, y, the residual, the tag and the report slot are written per call (functional.sync_batch_norm).
        if self.training:
            buf = stats.payload
            count = stats.slots.count
            n_args.update(normalize_arguments(x=None, y=None, stats=address(stats.data), buf=address(buf),
                                              **self._normalize_given))
            m_args = self._moments_plan.arguments()
            m_args.update(moments_arguments(x=None, pivot_state=self._pivot_state, pivot_payload=None, tag=0,
                                            buf=address(buf)))
            moments = backend.packed_launcher(self._moments_plan, m_args, self.stream)
            allreduce = prepared_allreduce(self.comm, buf, self.stream)
        else:
            n_args.update(normalize_arguments(x=None, y=None, stats=address(stats.data), **self._normalize_given))
        normalize = backend.packed_launcher(self._normalize_plan, n_args, self.stream)
        return Entry(stats, m_args, n_args, moments, normalize, allreduce, count)

    def recycle(self, entry: Entry) -> None:
        if len(self.free) < MAX_ENTRIES:
            self.free.append(entry)


class BackwardPlan:
    """The planned backward of one forward plan and ``dy`` signature, built from a backward
    that passed the full path: one argument pack per kernel (the data pointers and the tag
    written per call) and the backward payload. The ``r*`` / ``d*`` attributes are the
    backward-reduce / dx argument cells written per call."""

    def __init__(self, backend: Any, comm: Any, collective: bool, dy3: Any, x3: Any, dx3: Any, wg: Any, bg: Any,
                 buf: Any, ring: Any, reduce: bool, pdtype: str, new_wg: bool, new_bg: bool, y3: Any = None,
                 dresidual3: Any = None) -> None:
        self.backend, self.collective, self.pdtype = backend, collective, pdtype
        self.ring = ring if collective else None
        self.new_wg, self.new_bg = new_wg, new_bg
        self.dresidual = dresidual3 is not None         # dresidual wanted (a new array unless one is given)
        self.grad_shape = (x3.shape[1],)
        address = backend.address_of
        self.dy_align, self.x_align = address(dy3) & 15, address(x3) & 15
        self.dx_align = 0 if dx3 is None else address(dx3) & 15
        # Under ReLU the forward's y (the mask), and dresidual: 0 without them, as their pointers.
        self.y_align = 0 if y3 is None else address(y3) & 15
        self.dr_align = 0 if dresidual3 is None else address(dresidual3) & 15
        self.buf = buf
        stream = backend.current_stream().ptr
        self.reduce = self.dx = self.allreduce = None
        if reduce:
            grads = tuple(g for g in (wg, bg) if g is not None)
            plan = backend.launch_plan("backward", x3, (dy3, x3, y3), grads[0].dtype.name if grads else "float32")
            self.reduce_args = plan.arguments()       # all but buf are written per call
            self.reduce_args.update(backward_arguments(dy=None, x=None, stats=None, tag=0, weight_grad=None,
                                                       bias_grad=None, buf=address(buf), y=None))
            self.reduce = backend.packed_launcher(plan, self.reduce_args, stream)
            i = self.reduce_args.index
            self.rdy, self.rx, self.rstats, self.rtag, self.rwg, self.rbg, self.rmask = (
                i["dy"], i["x"], i["stats"], i["tag"], i["weight_grad"], i["bias_grad"], i["y"])
            if collective:
                self.allreduce = prepared_allreduce(comm, buf, stream)
        if dx3 is not None or dresidual3 is not None:
            plan = backend.launch_plan("dx", x3, (dy3, x3, dx3, y3, dresidual3), "")
            # The data pointers (and, collective: count, tag and report slot) are written per call.
            self.dx_args = plan.arguments()
            self.dx_args.update(dx_arguments(dy=None, x=None, dx=None, stats=None, ranks=comm.size, y=None,
                                             dresidual=None, buf=address(buf) if collective else None))
            self.dx = backend.packed_launcher(plan, self.dx_args, stream)
            i = self.dx_args.index
            self.ddy, self.dxx, self.ddx, self.dstats, self.dcount, self.dtag = (
                i["dy"], i["x"], i["dx"], i["stats"], i["count"], i["tag"])
            self.dreport, self.dseq, self.dmask, self.ddresidual = i["report"], i["seq"], i["y"], i["dresidual"]


def remember(key: tuple, plan: ForwardPlan) -> None:
    if not enabled:
        return
    if len(FORWARD) >= MAX_PLANS:
        FORWARD.pop(next(iter(FORWARD)))
    FORWARD[key] = plan


def clear() -> None:
    """Forget every plan (the next call of each signature takes the full path)."""
    FORWARD.clear()


thread_id = threading.get_ident
