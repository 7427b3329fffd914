"""The Paddle-style batch-norm layers: parameters, running statistics, train/eval.

Each layer holds state and calls :mod:`cusyncbn.functional` once per pass: the
protocol, the checks and the maths live there and below. What a forward keeps for
its backward waits on a short stack (backward takes the most recent one, LIFO).
"""
from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from typing import Any

from . import _state
from ._backend_factory import get_backend
from ._convert import walk
from ._comm import Communicator, SingleProcessComm
from ._comm_factory import resolve_comm, start_launched_mpi
from ._device import get_device, parse_device
from ._dlpack import framework_of, to_framework
from ._grad_mode import recording
from ._options import (check_comm_taken, check_initializer_shape, check_layer_options, check_output,
                       check_param_attr)
from ._params import ParamAttr, Parameter
from ._pending import raise_no_pending_forward
from ._rules import FORMATS, check_ndim
from .functional import BatchNormContext, sync_batch_norm, sync_batch_norm_backward


class _BatchNormBase:
    """Batch normalization over the channel axis; see :class:`SyncBatchNorm`."""

    _sync = False
    _formats: tuple = tuple(FORMATS)
    _ndims: tuple = (2, 3, 4, 5)
    _default_format = "NCHW"
    _prefix = "batch_norm"
    _counter = itertools.count()
    #: Forwards kept for a backward at most; beyond it the oldest is dropped with a warning
    #: (a loop that forgot ``cusyncbn.no_grad()`` must not keep every input alive).
    max_pending = 16

    def __init__(self, num_features: int, momentum: float = 0.9, epsilon: float = 1e-05,
                 weight_attr: Any = None, bias_attr: Any = None, data_format: str | None = None,
                 use_global_stats: bool | None = None, name: str | None = None, *,
                 comm: Any = None, dtype: str = "float32", unbiased_running_var: bool = False,
                 debug: bool | None = None, device: str | None = None, output: str = "backend",
                 nonfinite: str = "warn", act: str | None = None) -> None:
        cls = type(self).__name__
        options = check_layer_options(
            cls, self._formats, num_features=num_features, momentum=momentum, epsilon=epsilon,
            data_format=self._default_format if data_format is None else data_format, dtype=dtype, output=output,
            use_global_stats=use_global_stats, unbiased_running_var=unbiased_running_var, debug=debug,
            nonfinite=nonfinite, act=act)
        check_comm_taken(cls, self._sync, comm)
        weight_attr_checked = check_param_attr(weight_attr, "weight", cls)
        bias_attr_checked = check_param_attr(bias_attr, "bias", cls)
        self._nonfinite = options.nonfinite
        self._act = options.act
        self._num_features = options.num_features
        self._momentum = options.momentum
        self._epsilon = options.epsilon
        self._weight_attr = weight_attr
        self._bias_attr = bias_attr
        self._data_format = options.data_format
        self._use_global_stats = options.use_global_stats
        self._name = name if name is not None else f"{self._prefix}_{next(self._counter)}"
        self._dtype = options.dtype
        self._unbiased = options.unbiased_running_var
        self._debug = options.debug
        self._output = options.output
        self._device = get_device() if device is None else parse_device(device)
        self._comm_arg = comm
        self._comm: Communicator | None = None
        if not self._sync:
            self._comm = SingleProcessComm()
        elif comm is not None:
            self._comm = resolve_comm(comm, self._device)
        else:
            start_launched_mpi()               # a rank failing before the first forward ends the job
        self.training = True
        self.weight = self._make_param(weight_attr_checked, "weight", 1.0)
        self.bias = self._make_param(bias_attr_checked, "bias", 0.0)
        backend = get_backend(self._device)
        with backend.scope():
            self._mean = backend.xp.zeros((self._num_features,), self._dtype)
            self._variance = backend.xp.ones((self._num_features,), self._dtype)
        self._pending: list[BatchNormContext] = []
        self._dropped_warned = False

    def _make_param(self, attr: ParamAttr | None, role: str, default: float) -> Parameter | None:
        """The parameter ``role`` built from ``attr`` as :func:`check_param_attr` returns it."""
        if attr is None:
            return None
        backend = get_backend(self._device)
        shape = (self._num_features,)
        init = default if attr.initializer is None else attr.initializer
        with backend.scope():
            if callable(init):
                data = backend.import_array(init(shape, self._dtype), f"{role} initializer result")
                check_initializer_shape(data.shape, shape, role, type(self).__name__)
                data = backend.xp.array(data, dtype=self._dtype, copy=True)
            else:
                data = backend.xp.full(shape, float(init), self._dtype)
        return Parameter(data, attr.name or f"{self._name}.{role}", trainable=attr.trainable,
                         learning_rate=attr.learning_rate)

    # -- public attributes ----------------------------------------------------------------
    @property
    def num_features(self) -> int:
        return self._num_features

    @property
    def momentum(self) -> float:
        return self._momentum

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @property
    def name(self) -> str:
        return self._name

    @property
    def data_format(self) -> str:
        return self._data_format

    @property
    def device(self) -> str:
        return self._device

    @property
    def act(self) -> str | None:
        """The activation of the fused epilogue: None or ``"relu"`` (a constructor setting)."""
        return self._act

    @property
    def comm(self) -> Communicator:
        """The communicator statistics are synchronized over (resolved on first use)."""
        if self._comm is None:
            self._comm = resolve_comm(self._comm_arg, self._device)
        return self._comm

    @property
    def running_mean(self) -> Any:
        return self._mean

    @property
    def running_var(self) -> Any:
        return self._variance

    def train(self) -> "_BatchNormBase":
        self.training = True
        return self

    def eval(self) -> "_BatchNormBase":
        self.training = False
        return self

    def parameters(self) -> list[Parameter]:
        """The weight and bias that exist (running statistics are not parameters here)."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def clear_gradients(self) -> None:
        for p in self.parameters():
            p.clear_gradient()

    def state_dict(self) -> "OrderedDict[str, Any]":
        """``weight``, ``bias`` (when present), ``_mean``, ``_variance``: the live arrays."""
        out: OrderedDict[str, Any] = OrderedDict()
        if self.weight is not None:
            out["weight"] = self.weight.data
        if self.bias is not None:
            out["bias"] = self.bias.data
        out["_mean"] = self._mean
        out["_variance"] = self._variance
        return out

    def set_state_dict(self, state: dict, strict: bool = True, *, allow_nonfinite: bool = False) -> None:
        """Copy arrays from ``state`` into this layer, in place.

        Every entry is checked (known key, shape ``(num_features,)``, a floating dtype,
        finite values) before anything is written, so a bad state changes nothing.
        Values may be arrays of any DLPack producer; they are cast to the layer's dtype.

        Raises:
            KeyError: unknown key, or (``strict``) a key of ``state_dict()`` missing.
            ValueError / TypeError: a shape or dtype that does not fit; NaN or Inf
                (unless ``allow_nonfinite``).
        """
        targets = self.state_dict()
        _state.write(targets, _state.stage(targets, state, strict, self._device, self._name, allow_nonfinite),
                     self._device)

    def __repr__(self) -> str:
        act = "" if self._act is None else f", act={self._act!r}"
        return (f"{type(self).__name__}(num_features={self._num_features}, momentum={self._momentum}, "
                f"epsilon={self._epsilon}, data_format={self._data_format!r}, name={self._name!r}, "
                f"weight={self.weight is not None}, bias={self.bias is not None}, device={self._device!r}{act})")

    # -- forward / backward ---------------------------------------------------------------
    def __call__(self, x: Any, residual: Any = None, *, output: str | None = None) -> Any:
        return self.forward(x, residual, output=output)

    def forward(self, x: Any, residual: Any = None, *, output: str | None = None) -> Any:
        """Normalize ``x``; in training mode with batch statistics synchronized over ``comm``.

        With the fused epilogue, ``y = act(BN(x) + residual)`` in the same passes: the add of
        a residual block when ``residual`` is given, then ReLU when the layer was built with
        ``act="relu"`` (without reading and writing ``y`` again, as a separate add and
        activation would). Under ReLU the backward reads its mask ``y > 0`` from this ``y``:
        **do not modify y in place** before its backward.

        Batch statistics (training mode, or ``use_global_stats=False``) also move the running
        ones. Unless run under :func:`cusyncbn.no_grad`, the forward is kept for one
        :meth:`backward` (at most ``max_pending`` are kept: beyond, the oldest is dropped
        with a ``RuntimeWarning``). A bad call raises before any collective and changes
        nothing: no running statistic moves, no forward is kept.

        Args:
            x: ``(N, C, *)`` with a channel-second ``data_format``, ``(N, *, C)`` with a
                channel-last one (see ``Shape`` in :class:`SyncBatchNorm`): 2 to 5 dimensions
                (``BatchNorm1D/2D/3D``: 2 or 3, 4, 5), ``C == num_features``; float16,
                bfloat16, float32 or float64; a NumPy or CuPy array or any DLPack producer
                (torch, JAX, Paddle...) on the layer's device.
            residual: None, or an array added to the normalized ``x`` before the activation:
                the shape and dtype of ``x`` (in the layer's ``data_format``; any strides),
                on the layer's device. Its gradient is the second result of :meth:`backward`.
            output: ``"backend"`` (a NumPy or CuPy array) or ``"input"`` (``x``'s
                framework, through DLPack, without a copy). Default: the layer's ``output``.

        Returns:
            ``y``, with the shape and dtype of ``x`` (statistics and arithmetic in float32,
            float64 for float64 input).

        Raises:
            ValueError: ``x`` with another channel count or number of dimensions, or on
                another device than the layer; an unknown ``output``; a ``residual`` of
                another shape than ``x`` or on another device.
            TypeError: ``x`` not an array, or not of a floating dtype; a ``residual`` that
                is not an array or has another dtype than ``x``.
            RuntimeError: with ``debug``, another rank's call failed or makes another
                collective (every rank raises); the ranks' collectives are out of step.
            FloatingPointError: with ``nonfinite='raise'``, the global statistics of a
                channel are not finite (NaN or Inf in some rank's input); no running
                statistic moved. (On a GPU, raised by a later call into cusyncbn.)
        """
        framework = framework_of(x)
        if not self._sync:
            check_ndim(x, self._ndims, self._data_format, self._name)
        # As Paddle: batch statistics always move the running ones, also in eval mode with
        # use_global_stats=False. (Written out rather than in helpers: this is the per-call path.)
        batch = self.training if self._use_global_stats is None else not self._use_global_stats
        weight, bias = self.weight, self.bias
        y, ctx = sync_batch_norm(
            x, self._mean, self._variance, None if weight is None else weight.data, None if bias is None else bias.data,
            training=batch, momentum=self._momentum,
            epsilon=self._epsilon, data_format=self._data_format, comm=self.comm,
            unbiased_running_var=self._unbiased, nonfinite=self._nonfinite, debug=self._debug and self._sync,
            num_features=self._num_features, device=self._device, name=self._name, activation=self._act,
            residual=residual)
        if recording():
            self._keep(ctx)
        else:
            ctx.release()
        return self._hand_back(y, framework, output)

    def _keep(self, ctx: BatchNormContext) -> None:
        self._pending.append(ctx)
        if len(self._pending) > self.max_pending:
            self._pending.pop(0).release()
            if not self._dropped_warned:
                self._dropped_warned = True
                warnings.warn(f"{self._name}: more than {self.max_pending} forwards are waiting for a backward; "
                              "the oldest is dropped (it can no longer be back-propagated). Run inference "
                              "(also in eval mode) under `with cusyncbn.no_grad():` so that forwards keep nothing",
                              RuntimeWarning, stacklevel=3)

    def backward(self, dy: Any, *, output: str | None = None) -> Any:
        """Gradient w.r.t. ``x`` of the most recent forward not yet back-propagated (LIFO).

        Adds this rank's shares of the parameter gradients into ``weight.grad`` /
        ``bias.grad`` (created as zeros when None; trainable parameters only): their sum
        over ranks is the full gradient (see :func:`cusyncbn.allreduce_gradients`). After a
        forward with batch statistics it makes one all-reduce of ``2C + 2`` float64 values;
        after one with the running statistics none. A bad ``dy`` raises before the
        collective, leaves the forward pending and adds nothing to the gradients.

        After a forward with the fused epilogue every gradient is that of
        ``g = dy * (y > 0)`` under ``act="relu"`` (the mask read from that forward's ``y``),
        else of ``dy``; after a forward with a ``residual`` it also returns
        ``dresidual = g``.

        Args:
            dy: gradient of the loss w.r.t. that forward's ``y``: its shape, any floating
                dtype (cast to ``x``'s), a NumPy or CuPy array or any DLPack producer on
                the layer's device.
            output: as for :meth:`forward`.

        Returns:
            ``dx``, with the shape and dtype of that forward's ``x``; ``(dx, dresidual)`` when
            that forward had a ``residual`` (``dresidual`` of the residual's shape and dtype).

        Raises:
            RuntimeError: no forward is pending (with ``debug`` in training, every rank
                raises); the ranks' collectives are out of step.
            ValueError: ``dy`` not of the forward's input shape, or on another device; an
                unknown ``output``.
            TypeError: ``dy`` not an array, or not of a floating dtype.
        """
        framework = framework_of(dy)
        if not self._pending:
            raise_no_pending_forward(self._name, self.comm if self._debug and self._sync and self.training else None,
                                     self._num_features, self._dtype.name, self._device)
        ctx = self._pending[-1]
        grads = sync_batch_norm_backward(
            ctx, dy, weight_grad_out=self._grad_slot(self.weight), bias_grad_out=self._grad_slot(self.bias),
            weight_grad=False, bias_grad=False)
        self._pending.pop()
        if len(grads) == 4:                        # a forward with a residual: dresidual too
            return self._hand_back(grads[0], framework, output), self._hand_back(grads[3], framework, output)
        return self._hand_back(grads[0], framework, output)

    def _grad_slot(self, param: Parameter | None) -> Any:
        if param is None or not param.trainable:
            return None
        if param.grad is None:
            param.grad = get_backend(self._device).zeros(param.data.shape, param.data.dtype)
        return param.grad

    def _hand_back(self, y: Any, framework: str, output: str | None) -> Any:
        if output is None:
            output = self._output                  # checked when the layer was built
        else:
            check_output(output, self._name)
        return to_framework(y, framework) if output == "input" else y


class SyncBatchNorm(_BatchNormBase):
    """Cross-process synchronized batch normalization (``paddle.nn.SyncBatchNorm``).

    In training mode the mean and biased variance of each channel are those of the
    **global** batch (every element of that channel on every rank of ``comm``); one
    all-reduce of ``2C + 3`` float64 values per forward and one of ``2C + 2`` per backward,
    exact for uneven and empty per-rank batches. In eval mode the running statistics
    are used and no collective is made. The passes are those of
    :func:`cusyncbn.functional.sync_batch_norm`.

    Args:
        num_features: number of channels C.
        momentum: running statistics are updated as
            ``running = running * momentum + batch_stat * (1 - momentum)``. Default 0.9.
        epsilon: added to the variance. Default 1e-5.
        weight_attr, bias_attr: None (ones / zeros), False (no such parameter: behaves as
            weight 1 / bias 0 and exposes None), or a :class:`ParamAttr`.
        data_format: 'NC', 'NCL', 'NCHW', 'NCDHW' (channel second) or 'NLC', 'NHWC',
            'NDHWC' (channel last); it fixes the channel axis for input of 2 to 5 dimensions.
        name: layer name (parameter names and messages).
        comm: None (all processes of ``MPI.COMM_WORLD`` when launched by MPI with more
            than one process, else this process alone), an mpi4py communicator (e.g. a
            ``Split`` for group-wise sync), or a cusyncbn communicator.
        dtype: dtype of parameters and running statistics, 'float32' or 'float64'.
        unbiased_running_var: update the running variance with the unbiased (N/(N-1),
            global N) batch variance, as PyTorch does. Default False (Paddle's convention).
        debug: before each collective (and each eval forward), check with one extra small
            all-reduce that all ranks passed validation and agree on what the collective
            needs (its number on the communicator, the pass, the channel count, the
            statistics dtype, train/eval), and raise on every rank, naming the field and
            each rank's value, instead of hanging. Default: the ``CUSYNCBN_DEBUG``
            environment variable.
        device: 'cpu', 'gpu' or 'gpu:N' for this layer. Default: :func:`get_device`.
        output: 'backend' (return NumPy/CuPy arrays) or 'input' (the caller's framework).
        nonfinite: when a batch's global statistics are not finite for some channel (NaN or
            Inf in some rank's input), that channel's running statistics are left unchanged
            and every rank is told: 'warn' (a RuntimeWarning, once per layer) or 'raise'
            (FloatingPointError). On a GPU this is reported by a later call (no host sync).
        act: the activation of the fused epilogue, as ``paddle.nn.BatchNorm``'s ``act``
            (Paddle applies it to the batch norm's output): None (default) or ``"relu"``,
            which makes ``y = relu(BN(x) + residual)`` in the layer's own passes (the
            residual optional: see :meth:`forward`), with no extra pass over the tensor in
            the forward or the backward; the backward reads its mask from ``y``. A
            constructor setting like ``momentum``: converters carry it, state dicts and
            checkpoints do not hold it.

    Shape:
        - x: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)`` with a
          channel-second ``data_format``; ``(N, C)``, ``(N, L, C)``, ``(N, H, W, C)`` or
          ``(N, D, H, W, C)`` with a channel-last one; ``C == num_features``. ``N`` and the
          spatial sizes may differ between ranks, and ``N`` may be 0 on some. float16,
          bfloat16 (needs the ml_dtypes package; on a GPU, CuPy >= 14), float32 or float64.
        - residual (forward, optional): the shape and dtype of ``x``.
        - y (forward): the shape and dtype of ``x``.
        - dy, dx (backward): the shape of ``x``; ``dy`` of any floating dtype, ``dx`` of
          ``x``'s; after a forward with a residual, ``dresidual`` as ``dx``.
        - weight, bias, running_mean, running_var and the gradients ``weight.grad``,
          ``bias.grad``: ``(C,)``, of ``dtype``.

    Raises:
        ValueError: bad num_features, data_format, output, nonfinite or act (None or
            ``"relu"``); momentum outside [0, 1]; a negative or non-finite epsilon.
        TypeError: a non-numeric momentum or epsilon (``momentum=None`` included), bad
            weight_attr / bias_attr, dtype, comm or a non-boolean flag.

    Example:
        >>> import numpy as np, cusyncbn
        >>> bn = cusyncbn.SyncBatchNorm(2, device="cpu")
        >>> x = np.array([[[[0.3, 0.4], [0.3, 0.07]], [[0.83, 0.37], [0.18, 0.93]]]], np.float32)
        >>> y = bn(x)
        >>> dx = bn.backward(np.ones_like(y))
        >>> block = cusyncbn.SyncBatchNorm(2, device="cpu", act="relu")      # y = relu(BN(x) + residual)
        >>> y = block(x, np.ones_like(x))
        >>> bool((y >= 0).all())
        True
        >>> dx, dresidual = block.backward(np.ones_like(y))
        >>> bool((dresidual == (y > 0)).all())
        True
    """

    _sync = True
    _prefix = "sync_batch_norm"
    _counter = itertools.count()

    def __init__(self, num_features: int, momentum: float = 0.9, epsilon: float = 1e-05,
                 weight_attr: Any = None, bias_attr: Any = None, data_format: str = "NCHW",
                 name: str | None = None, *, comm: Any = None, dtype: str = "float32",
                 unbiased_running_var: bool = False, debug: bool | None = None, device: str | None = None,
                 output: str = "backend", nonfinite: str = "warn", use_global_stats: bool | None = None,
                 act: str | None = None) -> None:
        super().__init__(num_features, momentum, epsilon, weight_attr, bias_attr, data_format, use_global_stats,
                         name, comm=comm, dtype=dtype, unbiased_running_var=unbiased_running_var, debug=debug,
                         device=device, output=output, nonfinite=nonfinite, act=act)

    @classmethod
    def convert_sync_batchnorm(cls, layer: Any, *, comm: Any = None) -> Any:
        """Replace every local ``BatchNorm1D/2D/3D`` in ``layer`` by a new ``SyncBatchNorm``.

        Each new layer keeps everything of the layer it replaces: it is built from the old
        one's settings (num_features, momentum, epsilon, weight/bias attributes, data_format,
        ``use_global_stats``, name, dtype, device, ``unbiased_running_var``, debug, output,
        nonfinite, ``act``) and takes over every instance attribute (its Parameter objects and
        running-statistics arrays, as Paddle's converter does, train/eval mode, forwards
        waiting for a backward, attributes set by the user). Only the communicator is new.
        What a subclass of ``BatchNorm1D/2D/3D`` defines in its class (methods, class
        attributes) cannot move to a ``SyncBatchNorm``: such a layer is converted with a
        ``UserWarning`` naming them. Like Paddle's converted layers, the new ones take input
        of 2 to 5 dimensions. The model is walked through its children only (see
        ``cusyncbn._convert``); ``SyncBatchNorm`` layers already there are left as they are
        (with a ``UserWarning`` when ``comm`` is given and theirs is another).

        Args:
            layer: the model, or one batch-norm layer.
            comm: communicator for the new layers (see :class:`SyncBatchNorm`).

        Returns:
            The converted model (a new object when ``layer`` itself is a batch norm;
            containers are changed in place, tuples rebuilt).

        Example:
            >>> import cusyncbn
            >>> model = {"bn": cusyncbn.BatchNorm2D(8, device="cpu", use_global_stats=True)}
            >>> model = cusyncbn.SyncBatchNorm.convert_sync_batchnorm(model)
            >>> type(model["bn"]).__name__, model["bn"]._use_global_stats
            ('SyncBatchNorm', True)
        """
        from ._convert import carry_state, warn_lost_members
        from ._stacklevel import user_stacklevel

        def replace(old: _BatchNormBase) -> Any:
            if isinstance(old, SyncBatchNorm):
                if comm is not None and old._comm_arg is not comm:
                    warnings.warn(f"convert_sync_batchnorm: {old._name} is already a SyncBatchNorm and keeps its "
                                  "own communicator, not the comm= given", UserWarning, stacklevel=user_stacklevel())
                return old
            new = cls(old._num_features, old._momentum, old._epsilon, old._weight_attr, old._bias_attr,
                      old._data_format, old._name, comm=comm, dtype=old._dtype.name,
                      unbiased_running_var=old._unbiased, debug=old._debug, device=old._device, output=old._output,
                      nonfinite=old._nonfinite, use_global_stats=old._use_global_stats, act=old._act)
            base = next(k for k in (BatchNorm1D, BatchNorm2D, BatchNorm3D, _BatchNormBase) if isinstance(old, k))
            warn_lost_members(old, base, "convert_sync_batchnorm", old._name, f"cusyncbn.{base.__name__}",
                              f"cusyncbn.{cls.__name__}")
            carry_state(old, new, skip=("_comm", "_comm_arg"))
            return new

        return walk(layer, replace, lambda obj: isinstance(obj, _BatchNormBase))


class BatchNorm1D(_BatchNormBase):
    """Local (unsynchronized) batch norm over (N, C) or (N, C, L) input (``paddle.nn.BatchNorm1D``).

    Same arguments as :class:`SyncBatchNorm` plus ``use_global_stats`` (True: always
    the running statistics; False: always batch statistics; None: by mode); no ``comm``.
    ``act="relu"`` and ``forward(x, residual)`` fuse the epilogue as there.
    """

    _formats = ("NC", "NCL", "NLC")
    _ndims = (2, 3)
    _default_format = "NCL"
    _counter = itertools.count()


class BatchNorm2D(_BatchNormBase):
    """Local batch norm over (N, C, H, W) or (N, H, W, C) input (``paddle.nn.BatchNorm2D``)."""

    _formats = ("NCHW", "NHWC")
    _ndims = (4,)
    _default_format = "NCHW"
    _counter = itertools.count()


class BatchNorm3D(_BatchNormBase):
    """Local batch norm over (N, C, D, H, W) or (N, D, H, W, C) input (``paddle.nn.BatchNorm3D``)."""

    _formats = ("NCDHW", "NDHWC")
    _ndims = (5,)
    _default_format = "NCDHW"
    _counter = itertools.count()
