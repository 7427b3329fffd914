"""The batch-norm layers: the protocol, written once for every backend.

One training forward makes exactly one collective (the ``2C + 1`` float64 moments
payload), one training backward exactly one (the ``2C`` float64 gradient payload);
eval mode makes none. The maths of each step is written at the top of
``_backend.py``; this module decides what runs when, validates input before any
collective, and keeps the parameters, running statistics and pending forwards.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ._backend import TAG_LIMIT, Backend, backward_payload_size, dtype_name, get_backend
from ._comm import Communicator, SingleProcessComm, resolve_comm
from ._device import _parse as resolve_device, get_device
from ._dlpack import framework_of, to_framework, to_host
from ._params import ParamAttr, Parameter

# data_format -> whether the channel axis is last.
_FORMATS = {"NC": False, "NCL": False, "NCHW": False, "NCDHW": False,
            "NLC": True, "NHWC": True, "NDHWC": True}
_OUTPUTS = ("backend", "input")
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")

_state = threading.local()


@contextmanager
def no_grad() -> Iterator[None]:
    """Within this block, forwards keep nothing for a backward (inference loops).

    Example:
        >>> with cusyncbn.no_grad():            # doctest: +SKIP
        ...     y = bn(x)
    """
    previous = getattr(_state, "no_grad", False)
    _state.no_grad = True
    try:
        yield
    finally:
        _state.no_grad = previous


def _recording() -> bool:
    return not getattr(_state, "no_grad", False)


_tags: dict[int, list] = {}


def _next_tag(comm: Any) -> int:
    """The tag of the next collective on ``comm`` (see ``_backend.py``)."""
    entry = _tags.get(id(comm))
    if entry is None or entry[0] is not comm:
        entry = _tags[id(comm)] = [comm, 0]
    entry[1] = (entry[1] + 1) % TAG_LIMIT
    return entry[1]


def _debug_from_env() -> bool:
    return os.environ.get("CUSYNCBN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class _Saved:
    """What a forward keeps for its backward."""

    x3: Any
    shape: tuple
    stats: Any                  # backend Stats: mean, invstd and the folded coefficients
    count: Any                  # reduced count (1-element array), None for fixed statistics
    comm: Communicator
    framework: str
    call: int
    channel_last: bool


class _BatchNormBase:
    """Batch normalization over the channel axis; see :class:`SyncBatchNorm`."""

    _sync = False
    _formats: tuple = tuple(_FORMATS)
    _ndims: tuple = (2, 3, 4, 5)
    _default_format = "NCHW"
    _prefix = "batch_norm"
    _counter = itertools.count()

    def __init__(self, num_features: int, momentum: float = 0.9, epsilon: float = 1e-05,
                 weight_attr: Any = None, bias_attr: Any = None, data_format: str | None = None,
                 use_global_stats: bool | None = None, name: str | None = None, *,
                 comm: Any = None, dtype: str = "float32", unbiased_running_var: bool = False,
                 debug: bool | None = None, device: str | None = None, output: str = "backend") -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        data_format = self._default_format if data_format is None else data_format
        if data_format not in self._formats:
            raise ValueError(f"data_format must be one of {list(self._formats)} for {type(self).__name__}, "
                             f"got {data_format!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        if float(epsilon) < 0.0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"dtype (of parameters and running statistics) must be float32 or float64, got {dtype!r}")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        self._num_features = int(num_features)
        self._momentum = float(momentum)
        self._epsilon = float(epsilon)
        self._weight_attr = weight_attr
        self._bias_attr = bias_attr
        self._data_format = data_format
        self._channel_last = _FORMATS[data_format]
        self._use_global_stats = use_global_stats
        self._name = name if name is not None else f"{self._prefix}_{next(self._counter)}"
        self._dtype = np.dtype(dtype)
        self._unbiased = bool(unbiased_running_var)
        self._debug = _debug_from_env() if debug is None else bool(debug)
        self._output = output
        self._device = get_device() if device is None else resolve_device(device)
        self._backend: Backend = get_backend(self._device)
        self._comm_arg = comm
        self._comm: Communicator | None = None
        if not self._sync:
            if comm is not None:
                raise TypeError(f"{type(self).__name__} is not synchronized and takes no comm; "
                                "use SyncBatchNorm or convert_sync_batchnorm")
            self._comm = SingleProcessComm()
        elif comm is not None:
            self._comm = resolve_comm(comm, self._device)
        self.training = True
        self._track_running_stats = True
        self.weight = self._make_param(weight_attr, "weight", 1.0)
        self.bias = self._make_param(bias_attr, "bias", 0.0)
        self._mean = self._backend.zeros((self._num_features,), self._dtype)
        self._variance = self._backend.zeros((self._num_features,), self._dtype) + 1.0
        self._pending: list[_Saved] = []
        self._calls = {"forward": 0, "backward": 0}

    # -- construction helpers -------------------------------------------------------------
    def _make_param(self, attr: Any, role: str, default: float) -> Parameter | None:
        if attr is False:
            return None
        if attr is None or attr is True:
            attr = ParamAttr()
        if not isinstance(attr, ParamAttr):
            raise TypeError(f"{role}_attr must be None, False or a cusyncbn.ParamAttr, got {type(attr).__name__}")
        shape = (self._num_features,)
        init = default if attr.initializer is None else attr.initializer
        if callable(init):
            data = self._backend.import_array(init(shape, self._dtype), f"{role} initializer result")
            if tuple(data.shape) != shape:
                raise ValueError(f"{role} initializer returned shape {tuple(data.shape)}, expected {shape}")
            data = self._backend.xp.array(data, dtype=self._dtype, copy=True)
        else:
            data = self._backend.zeros(shape, self._dtype) + float(init)
        return Parameter(data, attr.name or f"{self._name}.{role}", trainable=attr.trainable,
                         learning_rate=attr.learning_rate)

    # -- public attributes ----------------------------------------------------------------
    @property
    def num_features(self) -> int:
        return self._num_features

    @property
    def device(self) -> str:
        return self._device

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

    def set_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays from ``state`` into this layer, in place.

        Every entry is checked (known key, shape ``(num_features,)``, a floating dtype,
        the layer's device) before anything is written, so a bad checkpoint changes
        nothing. Values may be arrays of any DLPack producer; they are cast to the
        layer's dtype.

        Raises:
            KeyError: unknown key, or (``strict``) a key of ``state_dict()`` missing.
            ValueError / TypeError: a shape or dtype that does not fit.
        """
        self._write_state(self._stage_state(state, strict))

    def _stage_state(self, state: dict, strict: bool) -> dict:
        """Check every entry of ``state`` and return them as arrays of this layer's device."""
        targets = self.state_dict()
        unknown = sorted(set(state) - set(targets))
        missing = sorted(set(targets) - set(state))
        if unknown:
            raise KeyError(f"set_state_dict: unexpected keys {unknown}; this layer has {list(targets)}")
        if strict and missing:
            raise KeyError(f"set_state_dict: missing keys {missing} (pass strict=False to load a subset)")
        staged = {}
        for key, value in state.items():
            # Checkpoints usually come from the host: copying them to the layer's device is the point.
            arr = value if self._backend.is_native(value) else self._backend.xp.asarray(to_host(value))
            if tuple(arr.shape) != (self._num_features,):
                raise ValueError(f"state[{key!r}] has shape {tuple(arr.shape)}, "
                                 f"expected shape ({self._num_features},)")
            if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
                raise TypeError(f"state[{key!r}] has dtype {arr.dtype}, expected a floating dtype")
            staged[key] = arr
        return staged

    def _write_state(self, staged: dict) -> None:
        targets = self.state_dict()
        for key, arr in staged.items():
            targets[key][...] = arr.astype(self._dtype)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_features={self._num_features}, momentum={self._momentum}, "
                f"epsilon={self._epsilon}, data_format={self._data_format}, device={self._device})")

    # -- forward / backward ---------------------------------------------------------------
    def __call__(self, x: Any, **kwargs: Any) -> Any:
        return self.forward(x, **kwargs)

    def forward(self, x: Any, *, output: str | None = None) -> Any:
        """Normalize ``x``; in training mode with batch statistics synchronized over ``comm``.

        Args:
            x: input of 2 to 5 dimensions in the layer's ``data_format`` (NumPy/CuPy
                array or any DLPack producer on the layer's device).
            output: ``"backend"`` (a NumPy or CuPy array) or ``"input"`` (the input's
                framework, through DLPack). Default: the layer's ``output``.

        Returns:
            ``y``, same shape and dtype as ``x``.
        """
        y, saved = self._forward(x)
        if _recording():
            self._pending.append(saved)
        else:
            self._backend.give_back(saved.stats)
        return self._hand_back(y, saved.framework, output)

    def backward(self, dy: Any, *, output: str | None = None) -> Any:
        """Gradient w.r.t. ``x`` of the most recent forward not yet back-propagated (LIFO).

        Accumulates this rank's partial sums into ``weight.grad`` / ``bias.grad``
        (their sum over ranks is the full gradient: see :func:`allreduce_gradients`).

        Raises:
            RuntimeError: no forward is pending.
            ValueError / TypeError: ``dy`` does not match the pending forward's input.
        """
        if not self._pending:
            raise RuntimeError(f"{self._name}: backward() called with no pending forward (each forward "
                               "outside cusyncbn.no_grad() can be back-propagated once)")
        framework = framework_of(dy)
        dx = self._backward(self._pending[-1], dy, pop=True)
        return self._hand_back(dx, framework, output)

    def _hand_back(self, y: Any, framework: str, output: str | None) -> Any:
        output = self._output if output is None else output
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        return to_framework(y, framework) if output == "input" else y

    def _uses_batch_stats(self) -> bool:
        if self._use_global_stats is not None:
            return not self._use_global_stats
        return self.training or not self._track_running_stats

    def _view3(self, x: Any, channel_last: bool | None = None) -> Any:
        c, shape = self._num_features, tuple(x.shape)
        channel_last = self._channel_last if channel_last is None else channel_last
        if channel_last or x.ndim == 2:
            return x.reshape(math.prod(shape[:-1]), c, 1)
        return x.reshape(shape[0], c, math.prod(shape[2:]))

    def _check_input(self, x: Any, channel_last: bool | None = None) -> Any:
        backend = self._backend
        channel_last = self._channel_last if channel_last is None else channel_last
        x = backend.import_array(x, "x")
        if x.dtype.kind != "f" and dtype_name(x.dtype) != "bfloat16":
            raise TypeError(f"{self._name}: x must have a floating dtype ({', '.join(_FLOAT_NAMES)}), "
                            f"got {x.dtype}")
        if x.ndim not in self._ndims:
            raise ValueError(f"{self._name}: x must have {' or '.join(map(str, self._ndims))} dimensions "
                             f"for data_format {self._data_format!r}, got shape {tuple(x.shape)}")
        axis = x.ndim - 1 if channel_last else 1
        if x.shape[axis] != self._num_features:
            raise ValueError(f"{self._name}: x has {x.shape[axis]} channels on axis {axis} "
                             f"(data_format {self._data_format!r}, shape {tuple(x.shape)}), "
                             f"expected num_features={self._num_features}")
        return backend.contiguous(x)

    def _signature(self, phase: str, x: Any) -> str:
        rest = tuple(x.shape[1:]) if x is not None else None
        return (f"layer={self._name} {phase}#{self._calls[phase]} "
                f"shape[1:]={rest} dtype={getattr(x, 'dtype', None)}")

    def _guard(self, phase: str, collective: bool, check: Any) -> Any:
        """Run ``check()``; in debug mode first compare call signatures across ranks."""
        error: Exception | None = None
        value = None
        try:
            value = check()
        except (TypeError, ValueError, RuntimeError) as exc:
            error = exc
        if self._debug and collective and self.comm.size > 1:
            shown = value[0] if isinstance(value, tuple) else value
            self._debug_exchange(self._signature(phase, shown), error)
        if error is not None:
            raise error
        return value

    def _debug_exchange(self, signature: str, error: Exception | None) -> None:
        comm = self.comm
        digest = int.from_bytes(hashlib.blake2b(signature.encode(), digest_size=6).digest(), "little")
        table = np.zeros(2 * comm.size, dtype=np.float64)
        table[2 * comm.rank] = float(digest)
        table[2 * comm.rank + 1] = 1.0 if error is not None else 0.0
        buf = self._backend.xp.asarray(table)
        comm.allreduce(buf)
        table = np.asarray(buf.get() if hasattr(buf, "get") else buf)
        digests = table[0::2]
        failed = [r for r in range(comm.size) if table[2 * r + 1] != 0.0]
        # The reference is the most common signature; ties go to rank 0's.
        votes = {d: int(np.sum(digests == d)) for d in digests}
        best = max(votes.values())
        reference = digests[0] if votes[digests[0]] == best else max(votes, key=votes.get)
        diverging = [r for r in range(comm.size) if digests[r] != reference]
        if error is not None or not (failed or diverging):
            return
        if failed:
            raise RuntimeError(f"{self._name} (debug): input validation failed on rank(s) {failed}; "
                               f"this rank ({comm.rank}) had {signature}")
        raise RuntimeError(f"{self._name} (debug): rank(s) {diverging} disagree with the others on "
                           f"(layer name, call count, shape of the non-batch axes, dtype); this rank "
                           f"({comm.rank}) has {signature}")

    def _forward(self, x: Any, momentum: float | None = None,
                 channel_last: bool | None = None) -> tuple[Any, _Saved]:
        """Forward returning ``(y, saved)``; ``momentum`` / ``channel_last`` override the layer's."""
        channel_last = self._channel_last if channel_last is None else channel_last
        framework = framework_of(x)
        batch_stats = self._uses_batch_stats()
        comm = self.comm if batch_stats else None
        collective = batch_stats and comm is not None and comm.size > 1
        x = self._guard("forward", collective, lambda: self._check_input(x, channel_last))
        self._calls["forward"] += 1
        backend, c = self._backend, self._num_features
        x3 = self._view3(x, channel_last)
        stats = backend.take_stats(c, np.float64 if x.dtype == np.float64 else np.float32)
        weight, bias = self._data(self.weight), self._data(self.bias)
        running = self._track_running_stats
        count = None
        if batch_stats:
            buf = stats.payload
            tag = _next_tag(comm)
            backend.local_moments(x3, self._mean if running else None, tag, buf)
            comm.allreduce(buf)
            update = running and self.training
            y3 = backend.empty(x3.shape, x.dtype)
            backend.normalize_batch(x3, buf, tag, comm.size, self._mean if running else None,
                                    self._variance if update else None,
                                    self._momentum if momentum is None else float(momentum), self._epsilon,
                                    self._unbiased, weight, bias, stats, y3)
            count = buf[2 * c:2 * c + 1]
        else:
            comm = SingleProcessComm()
            y3 = backend.empty(x3.shape, x.dtype)
            backend.normalize_fixed(x3, self._mean, self._variance, self._epsilon, weight, bias, stats, y3)
        saved = _Saved(x3, tuple(x.shape), stats, count, comm, framework, self._calls["forward"], channel_last)
        return y3.reshape(x.shape), saved

    @staticmethod
    def _data(param: Parameter | None) -> Any:
        return None if param is None else param.data

    def _check_grad_output(self, saved: _Saved, dy: Any) -> Any:
        dy = self._backend.import_array(dy, "dy")
        if dy.dtype.kind != "f" and dtype_name(dy.dtype) != "bfloat16":
            raise TypeError(f"{self._name}: dy must have a floating dtype, got {dy.dtype}")
        if tuple(dy.shape) != saved.shape:
            raise ValueError(f"{self._name}: dy has shape {tuple(dy.shape)}, expected {saved.shape} "
                             f"(the input of forward call #{saved.call})")
        if dy.dtype != saved.x3.dtype:
            dy = dy.astype(saved.x3.dtype)
        return self._backend.contiguous(dy)

    def _backward(self, saved: _Saved, dy: Any, pop: bool = False) -> Any:
        """Backward for ``saved``; with ``pop`` the pending entry is dropped once ``dy`` is valid."""
        collective = saved.count is not None and saved.comm.size > 1
        dy = self._guard("backward", collective, lambda: self._check_grad_output(saved, dy))
        if pop:
            self._pending.pop()
        self._calls["backward"] += 1
        backend, c = self._backend, self._num_features
        dy3 = self._view3(dy, saved.channel_last)
        weight_grad = self._grad_slot(self.weight)
        bias_grad = self._grad_slot(self.bias)
        buf = None
        tag = _next_tag(saved.comm) if saved.count is not None else 0
        if saved.count is not None or weight_grad is not None or bias_grad is not None:
            buf = backend.scratch("backward payload", backward_payload_size(c), np.float64)
            backend.backward_reduce(dy3, saved.x3, saved.stats, weight_grad, bias_grad, tag, buf)
        if saved.count is not None:
            saved.comm.allreduce(buf)
        dx3 = backend.empty(saved.x3.shape, saved.x3.dtype)
        backend.backward_input(dy3, saved.x3, saved.stats, buf, saved.count, tag, saved.comm.size, dx3)
        if pop:                          # popped: nothing refers to these statistics any more
            backend.give_back(saved.stats)
        return dx3.reshape(saved.shape)

    def _grad_slot(self, param: Parameter | None) -> Any:
        if param is None or not param.trainable:
            return None
        if param.grad is None:
            param.grad = self._backend.zeros(param.data.shape, param.data.dtype)
        return param.grad


class SyncBatchNorm(_BatchNormBase):
    """Cross-process synchronized batch normalization (``paddle.nn.SyncBatchNorm``).

    In training mode the mean and biased variance of each channel are those of the
    **global** batch (every element of that channel on every rank of ``comm``); one
    all-reduce of ``2C + 1`` float64 values per forward and one of ``2C`` per backward,
    exact for uneven and empty per-rank batches. In eval mode the running statistics
    are used and no collective is made.

    Args:
        num_features: number of channels C.
        momentum: running statistics are updated as
            ``running = running * momentum + batch_stat * (1 - momentum)``. Default 0.9.
        epsilon: added to the variance. Default 1e-5.
        weight_attr, bias_attr: None (ones / zeros), False (no such parameter: behaves as
            weight 1 / bias 0 and exposes None), or a :class:`ParamAttr`.
        data_format: 'NC', 'NCL', 'NCHW', 'NCDHW' (channel second) or 'NLC', 'NHWC',
            'NDHWC' (channel last); it fixes the channel axis for input of 2 to 5 dimensions.
        name: layer name (parameter names and debug messages).
        comm: None (all processes of ``MPI.COMM_WORLD`` when launched by MPI with more
            than one process, else this process alone), an mpi4py communicator (e.g. a
            ``Split`` for group-wise sync), or a cusyncbn communicator.
        dtype: dtype of parameters and running statistics, 'float32' or 'float64'.
        unbiased_running_var: update the running variance with the unbiased (N/(N-1),
            global N) batch variance, as PyTorch does. Default False (Paddle's convention).
        debug: check before each collective, with one extra small all-reduce, that all
            ranks agree on (layer name, call count, non-batch shape, dtype) and raise on
            every rank instead of hanging. Default: the ``CUSYNCBN_DEBUG`` environment variable.
        device: 'cpu', 'gpu' or 'gpu:N' for this layer. Default: :func:`get_device`.
        output: 'backend' (return NumPy/CuPy arrays) or 'input' (the caller's framework).

    Raises:
        ValueError: bad num_features, momentum, epsilon or data_format.
        TypeError: bad weight_attr / bias_attr, dtype or comm.

    Example:
        >>> import numpy as np, cusyncbn
        >>> bn = cusyncbn.SyncBatchNorm(2, device="cpu")
        >>> x = np.array([[[[0.3, 0.4], [0.3, 0.07]], [[0.83, 0.37], [0.18, 0.93]]]], np.float32)
        >>> y = bn(x)
        >>> dx = bn.backward(np.ones_like(y))
    """

    _sync = True
    _prefix = "sync_batch_norm"
    _counter = itertools.count()

    def __init__(self, num_features: int, momentum: float = 0.9, epsilon: float = 1e-05,
                 weight_attr: Any = None, bias_attr: Any = None, data_format: str = "NCHW",
                 name: str | None = None, **options: Any) -> None:
        super().__init__(num_features, momentum, epsilon, weight_attr, bias_attr, data_format,
                         None, name, **options)

    @classmethod
    def convert_sync_batchnorm(cls, layer: Any, comm: Any = None) -> Any:
        """Replace every local ``BatchNorm1D/2D/3D`` in ``layer`` by a ``SyncBatchNorm``.

        ``layer`` is a batch-norm layer or any object holding layers in attributes,
        lists, tuples or dicts (walked recursively). Each replacement shares the same
        Parameter objects and running-statistics arrays as the layer it replaces.

        Args:
            layer: the model.
            comm: communicator for the new layers (see :class:`SyncBatchNorm`).

        Returns:
            The converted model (a new object only when ``layer`` itself is a batch norm;
            containers are changed in place, tuples rebuilt).

        Example:
            >>> model = {"bn": cusyncbn.BatchNorm2D(8, device="cpu")}
            >>> model = cusyncbn.SyncBatchNorm.convert_sync_batchnorm(model)
            >>> type(model["bn"]).__name__
            'SyncBatchNorm'
        """
        return _convert(layer, comm, {})


def _convert(obj: Any, comm: Any, memo: dict) -> Any:
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _BatchNormBase) and not isinstance(obj, SyncBatchNorm):
        new = SyncBatchNorm.__new__(SyncBatchNorm)
        new.__dict__.update(obj.__dict__)
        new._comm_arg, new._comm = comm, None
        if comm is not None:
            new._comm = resolve_comm(comm, obj._device)
        new._formats = tuple(_FORMATS)
        new._ndims = (2, 3, 4, 5)
        new._use_global_stats = None
        new._pending = []
        memo[id(obj)] = new
        return new
    memo[id(obj)] = obj
    if isinstance(obj, list):
        obj[:] = [_convert(v, comm, memo) for v in obj]
    elif isinstance(obj, tuple):
        converted = tuple(_convert(v, comm, memo) for v in obj)
        obj = type(obj)(*converted) if hasattr(obj, "_fields") else converted
        memo[id(obj)] = obj
    elif isinstance(obj, dict):
        for key in list(obj):
            obj[key] = _convert(obj[key], comm, memo)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__ != "builtins" \
            and not _is_array_like(obj):
        for key, value in list(vars(obj).items()):
            new = _convert(value, comm, memo)
            if new is not value:
                setattr(obj, key, new)
    return obj


def _is_array_like(obj: Any) -> bool:
    return hasattr(obj, "__array_interface__") or hasattr(obj, "__dlpack__")


class BatchNorm1D(_BatchNormBase):
    """Local (unsynchronized) batch norm over (N, C) or (N, C, L) input (``paddle.nn.BatchNorm1D``).

    Same arguments as :class:`SyncBatchNorm` plus ``use_global_stats`` (True: always
    the running statistics; False: always batch statistics; None: by mode); no ``comm``.
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
