"""Paddle drop-in: ``paddle.nn.SyncBatchNorm`` running on cusyncbn.

Importing this module imports Paddle (``import cusyncbn`` alone does not). The layer is
a ``paddle.nn.SyncBatchNorm`` (same constructor, attributes, parameters and state-dict
keys) whose forward and backward are one call each of :mod:`cusyncbn.functional`
through a ``paddle.autograd.PyLayer``, so Paddle's optimizers and ``loss.backward()``
work unchanged. It is exact for uneven and empty per-rank batches, and it syncs through
a cusyncbn communicator: under plain ``mpirun`` on CPUs or GPUs, with no
``paddle.distributed`` set-up.

Tensors cross to NumPy (CPU) or CuPy (GPU) through DLPack without a copy: inputs,
parameters and running statistics are read, and the running statistics updated in
place, in the memory of the Paddle tensors (``tensor.detach()`` first, since Paddle
refuses to export a tensor that requires gradients; ``Tensor.numpy()`` would copy).
On a GPU the kernels run on Paddle's current stream.

Like PyTorch's SyncBatchNorm, the backward leaves *this rank's share* of the
``weight`` / ``bias`` gradients in ``.grad`` (their sum over ranks is the full
gradient): all-reduce parameter gradients as in any data-parallel loop, e.g. with
:func:`allreduce_gradients` or Paddle's ``DataParallel``.

Example (``mpiexec -n 2 python train.py``)::

    import cusyncbn.paddle as cbp
    model = cbp.convert_sync_batchnorm(model)      # every BatchNorm* -> cbp.SyncBatchNorm
"""
from __future__ import annotations

import copy
import functools
import warnings
import weakref
from contextlib import nullcontext
from operator import methodcaller
from typing import Any, Iterable, NamedTuple

import numpy as np
import paddle
from paddle.autograd import PyLayer
from paddle import _legacy_C_ops
from paddle.base.framework import EagerParamBase

from ._convert import carry_state, warn_lost_members
from ._dlpack import device_of
from ._grads import allreduce_gradients as _allreduce_arrays
from ._options import check_act
from ._rules import FORMATS
from ._backend_factory import get_backend
from .functional import sync_batch_norm, sync_batch_norm_backward
from ._stacklevel import user_stacklevel
from ._streams import external_stream

__all__ = ["SyncBatchNorm", "allreduce_gradients", "convert_sync_batchnorm"]

if not hasattr(paddle.Tensor, "__dlpack_device__"):       # added in Paddle 3.0 (with Tensor.__dlpack__)
    raise ImportError(f"cusyncbn.paddle needs PaddlePaddle >= 3.0 (Tensor.__dlpack__ / __dlpack_device__), "
                      f"found {paddle.__version__}")


def _on_paddle_stream(device: str) -> Any:
    """Context in which CuPy's current stream is Paddle's current stream on ``device``
    (``"gpu:N"``): the kernels queue behind Paddle's own work with no cross-stream event.
    A no-op on the CPU."""
    if device == "cpu":
        return nullcontext()
    index = int(device.split(":")[1])
    with warnings.catch_warnings():                 # paddle.device.cuda is deprecated in favour of
        warnings.simplefilter("ignore")             # paddle.device, whose Stream lacks an int pointer
        ptr = paddle.device.cuda.current_stream(index).cuda_stream
    return external_stream(index, int(ptr))


def _array(t: Any, device: str) -> Any:
    """A NumPy / CuPy array sharing the memory of Paddle tensor ``t`` (writes land in ``t``)."""
    data = t.detach()
    if device == "cpu":
        return np.from_dlpack(data)
    import cupy
    return cupy.from_dlpack(data)


_data_ptr = methodcaller("data_ptr")
_LABELS: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()    # see SyncBatchNorm._where


def _layout(t: Any) -> tuple:
    """What a planned call keys a Paddle tensor's layout on: strides and GPU index."""
    return tuple(t.strides), t.place.gpu_device_id()


@functools.lru_cache(maxsize=1)
def _cupy_takes_bfloat16() -> bool:
    """Whether CuPy imports bfloat16 arrays (CuPy >= 14 with ml_dtypes): then bfloat16 GPU
    tensors go to the kernels as they are, else through a float32 copy."""
    try:
        import cupy
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return int(cupy.__version__.split(".")[0]) >= 14


class _UnsupportedDtype(TypeError, RuntimeError):
    """An input dtype that no batch norm takes (integers, bool, complex): cusyncbn's
    ``TypeError``, and also the ``RuntimeError`` Paddle raises there (no kernel registered
    for that dtype), so that code written against either catches it."""


class _Settings(NamedTuple):
    """The plain settings of one pass, read by the PyLayer by name (built per call by
    :meth:`SyncBatchNorm.forward`, never holding the layer)."""

    training: bool                 # batch statistics or not
    momentum: float
    epsilon: float
    data_format: str
    comm: Any                      # the comm= argument
    num_features: int
    device: str                    # x's device
    where: str                     # the layer's name in messages
    stats_dtype: Any               # the Paddle dtype of the running statistics
    activation: str | None         # the fused epilogue's activation: None or "relu"


def _core_forward(x: Any, residual: Any, arrays: tuple, settings: _Settings) -> tuple:
    """``(y, ctx, wide)``: one call of the functional core's forward on Paddle tensor ``x``;
    ``wide`` is the input's dtype when the core ran on a float32 copy of it (bfloat16 on the
    CPU, where NumPy has no bfloat16, or on a GPU whose CuPy imports none), else None.

    Args:
        x: the layer's input.
        residual: None, or the Paddle tensor added before the activation (``x``'s shape,
            dtype and device: see :meth:`SyncBatchNorm.forward`).
        arrays: ``(running_mean, running_var, weight, bias)``: NumPy / CuPy arrays sharing
            the memory of the layer's tensors; the running statistics are updated in place.
        settings: the pass's :class:`_Settings`.

    Raises:
        ValueError: float32 / float64 input in another dtype than ``stats_dtype``; what
            the functional core raises (before any collective or write).
        TypeError: a non-floating input (also a ``RuntimeError``, as Paddle's).
    """
    device, where, stats_dtype = settings.device, settings.where, settings.stats_dtype
    gpu = device != "cpu"
    wide = None
    dtype = x.dtype
    if dtype != stats_dtype:
        if dtype == paddle.bfloat16:
            if not (gpu and _cupy_takes_bfloat16()):
                # As Paddle's bfloat16 kernel: statistics and arithmetic in float32, y rounded
                # to bfloat16 (the float32 copy is exact; the cast back rounds to nearest even).
                wide, x = dtype, x.detach().astype("float32")
                if residual is not None:
                    residual = residual.detach().astype("float32")
        elif dtype in (paddle.float32, paddle.float64):
            raise ValueError(f"{where}: x is {dtype} but this layer's parameters and running statistics "
                             f"are {stats_dtype}; as in Paddle's batch norms, float32 / float64 input must "
                             "have their dtype (cast x, or the layer with layer.to(dtype=...))")
    if gpu:
        # Planned calls may then take Paddle tensors as they are (on Paddle's current stream).
        get_backend(device).accept_array_type(paddle.Tensor, _data_ptr, _layout)
    out = paddle.empty_like(x) if gpu else None
    if residual is not None:
        residual = residual.detach() if gpu else _array(residual, device)
    with _on_paddle_stream(device):
        try:
            y, ctx = sync_batch_norm(
                x.detach() if gpu else _array(x, device), *arrays, training=settings.training,
                momentum=settings.momentum, epsilon=settings.epsilon, data_format=settings.data_format,
                comm=settings.comm, num_features=settings.num_features, device=device, name=where, out=out,
                activation=settings.activation, residual=residual)
        except TypeError as exc:
            if not x.is_floating_point():
                raise _UnsupportedDtype(str(exc)) from None
            raise
    y = out if gpu else paddle.from_dlpack(y)
    return (y if wide is None else y.astype(wide)), ctx, wide


class _Function(PyLayer):
    """One call of the functional core per pass, as torch's ``_functions.SyncBatchNorm``:
    tensors and plain settings in (see :func:`_core_forward`), never the layer; ``dx`` and
    the backward all-reduce only when the input needs a gradient; after a forward with a
    residual its gradient comes back too (None when it needs none, as Paddle requires)."""

    @staticmethod
    def forward(ctx: Any, x: Any, weight: Any, bias: Any, residual: Any, arrays: tuple, settings: _Settings) -> Any:
        y, ctx.core, ctx.wide = _core_forward(x, residual, arrays, settings)
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient,
                     residual is not None and not residual.stop_gradient)
        ctx.params = (weight, bias)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Any) -> tuple:
        need_x, need_w, need_b, need_r = ctx.needs
        core, ctx.core = ctx.core, None
        weight, bias = ctx.params
        ctx.params = None
        device = core.device
        wide = ctx.wide                 # the input's dtype when the core ran on a float32 copy
        if wide is not None and dy.dtype != paddle.float32:
            dy = dy.astype("float32")
        with _on_paddle_stream(device):
            if device == "cpu":
                grads = sync_batch_norm_backward(core, _array(dy, device), input_grad=need_x, weight_grad=need_w,
                                                 bias_grad=need_b, residual_grad=need_r)
            else:
                # Outputs from Paddle's allocator, written in place: no CuPy allocation and no
                # DLPack export per call; repeated calls take the planned path.
                outs = {}
                if need_x:
                    outs["input_grad_out"] = paddle.empty_like(dy)
                if need_w:
                    outs["weight_grad_out"] = paddle.zeros_like(weight)
                if need_b:
                    outs["bias_grad_out"] = paddle.zeros_like(bias)
                if need_r:
                    outs["residual_grad_out"] = paddle.empty_like(dy)
                grads = sync_batch_norm_backward(core, dy.detach(), input_grad=need_x, weight_grad=need_w,
                                                 bias_grad=need_b, residual_grad=need_r, **outs)
            grads = [None if g is None else g if isinstance(g, paddle.Tensor) else paddle.from_dlpack(g)
                     for g in grads]
            if wide is not None:               # the input's dtype for the input's (and residual's) gradient
                grads[0] = None if grads[0] is None else grads[0].astype(wide)
                if len(grads) == 4 and grads[3] is not None:
                    grads[3] = grads[3].astype(wide)
            return tuple(grads)


class SyncBatchNorm(paddle.nn.SyncBatchNorm):
    """Drop-in for ``paddle.nn.SyncBatchNorm`` backed by cusyncbn: exact for uneven and
    empty per-rank batches, numerically stable, and synchronized under plain ``mpirun``.

    A subclass of ``paddle.nn.SyncBatchNorm``: same constructor, attributes (``weight``,
    ``bias``, ``_mean``, ``_variance``, ``_momentum``, ``_epsilon``, ``_data_format``,
    ``_weight_attr``, ``_bias_attr``), parameters and state-dict keys; as there,
    ``weight_attr=False`` / ``bias_attr=False`` give a frozen weight of ones / bias of
    zeros. Training normalizes with the mean and biased variance of the global batch
    (every rank of ``comm``) and updates ``running = running * momentum + batch *
    (1 - momentum)``; eval uses the running statistics and makes no collective. The
    layer follows its input: CPU tensors run on NumPy, GPU tensors on cusyncbn's CUDA
    kernels (CuPy), on Paddle's current stream; parameters must live on the input's device.

    Inputs, as in Paddle's kernels: float32 / float64 in the parameters' dtype; float16 and
    bfloat16 with float32 parameters and statistics (statistics and arithmetic in float32,
    ``y`` and ``x.grad`` rounded to the input's dtype), on the CPU too, where Paddle has no
    16-bit batch-norm kernel (bfloat16 goes through a float32 copy where NumPy or CuPy take
    none). A global batch of one value per channel gives ``y = bias`` and moves the running
    statistics, as Paddle's SyncBatchNorm kernel does (its CPU ``BatchNorm*D`` return ``x``).
    A failing call changes nothing: errors are raised before any collective or write.

    Args:
        num_features: number of channels C.
        momentum: of the running statistics (Paddle's convention). Default 0.9.
        epsilon: added to the variance. Default 1e-5.
        weight_attr, bias_attr: None, a ``paddle.ParamAttr``, or False (frozen ones / zeros).
        data_format: 'NC', 'NCL', 'NCHW', 'NCDHW' (channels second) or 'NLC', 'NHWC',
            'NDHWC' (channels last); input of 2 to 5 dimensions either way.
        name: layer name (names of the running statistics; messages).
        comm: None (all MPI ranks when launched by MPI with several processes, else this
            process alone), an mpi4py communicator (e.g. ``MPI.COMM_WORLD.Split(...)``) or a
            cusyncbn communicator. ``paddle.distributed`` is not needed.
        use_global_stats: as Paddle's ``BatchNorm*D``: True always normalizes with the
            running statistics, False always with the batch statistics (updating the
            running ones, in eval too, as Paddle does), None by mode.
        act: the activation applied to the output, as ``paddle.nn.BatchNorm``'s ``act``:
            None (default) or ``"relu"``, fused into the batch norm's own passes with the
            add of ``forward``'s ``residual`` (``y = relu(BN(x) + residual)``), with no
            separate elementwise pass forward or backward. The backward reads the ReLU mask
            from ``y``: do not modify ``y`` in place before its backward (Paddle does not
            detect it). Not in the state dict, as in Paddle.

    Raises:
        ValueError: unknown ``data_format``; an ``act`` other than None or ``"relu"``; at
            forward (as Paddle's ``ValueError``), an input whose dimensions or channel count
            do not fit, or float32 / float64 input in another dtype than the parameters; a
            ``residual`` of another shape than the input, or on another device.
        TypeError: at forward, an unusable ``comm``, or a non-floating input (then also a
            ``RuntimeError``, which Paddle raises there: it has no kernel for that dtype); a
            ``residual`` that is not a ``paddle.Tensor`` or of another dtype than the input.

    Example:
        >>> import paddle, cusyncbn.paddle as cbp
        >>> bn = cbp.SyncBatchNorm(2)
        >>> x = paddle.to_tensor([[[[0.3, 0.4], [0.3, 0.07]], [[0.83, 0.37], [0.18, 0.93]]]])
        >>> x.stop_gradient = False
        >>> y = bn(x)
        >>> y.sum().backward()        # x.grad, bn.weight.grad, bn.bias.grad
        >>> block = cbp.SyncBatchNorm(2, act="relu")                  # y = relu(BN(x) + residual)
        >>> z = paddle.ones_like(x)
        >>> z.stop_gradient = False
        >>> y = block(x, z)
        >>> y.sum().backward()        # z.grad = (y > 0) too
    """

    def __init__(self, num_features: int, momentum: float = 0.9, epsilon: float = 1e-05, weight_attr: Any = None,
                 bias_attr: Any = None, data_format: str = "NCHW", name: str | None = None, *, comm: Any = None,
                 use_global_stats: bool | None = None, act: str | None = None) -> None:
        if data_format not in FORMATS:
            raise ValueError(f"SyncBatchNorm: data_format must be one of {list(FORMATS)}, got {data_format!r}")
        if use_global_stats is not None and not isinstance(use_global_stats, bool):
            raise TypeError(f"SyncBatchNorm: use_global_stats must be None, True or False, got {use_global_stats!r}")
        act = check_act(act, "SyncBatchNorm")
        super().__init__(num_features, momentum, epsilon, weight_attr, bias_attr, data_format, name)
        self._use_global_stats = use_global_stats
        self._comm = comm
        # None or "relu" (fused); the converter may set another activation of a
        # paddle.nn.BatchNorm(act=...), then applied after the batch norm as Paddle applies it.
        self._act: str | None = act

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self._use_global_stats is not None:
            text += f", use_global_stats={self._use_global_stats}"
        if self._act is not None:
            text += f", act={self._act}"
        return text + ", backend=cusyncbn"

    def _where(self) -> str:
        """This layer's name in messages and its key for once-per-layer warnings: its ``name``,
        else Paddle's ``full_name()``, with its path in the model when the converter made it
        (``sync_batch_norm_3 (backbone.1)``), made unique among live layers (a deep copy, e.g.
        an EMA model, keeps all that: it becomes ``...#2``)."""
        cached = self.__dict__.get("_cusyncbn_where")
        label = self.__dict__.get("_cusyncbn_path")
        if cached is not None and cached[0] == id(self) and cached[1] == self._name and cached[3] == label:
            return cached[2]
        base = (self._name or self.full_name()) + (f" ({label})" if label else "")
        where, copies = base, 1
        while _LABELS.get(where, self) is not self:
            copies += 1
            where = f"{base}#{copies}"
        _LABELS[where] = self
        self.__dict__["_cusyncbn_where"] = (id(self), self._name, where, label)
        return where

    def __getstate__(self) -> dict:
        # What this process imported (arrays sharing the tensors' memory) and this layer's
        # label are its own: a deep copy or a pickle starts without them.
        state = dict(super().__getstate__())
        state.pop("_cusyncbn_arrays", None)
        state.pop("_cusyncbn_where", None)
        return state

    def _param_array(self, attr: str, device: str) -> Any:
        """The NumPy / CuPy array sharing the memory of this layer's tensor ``attr``, imported
        once and reused while the tensor (and its memory) stays the same: a planned call keys
        on the arrays' identities."""
        t = getattr(self, attr)
        cache = self.__dict__.setdefault("_cusyncbn_arrays", {})
        cached = cache.get(attr)
        if cached is not None and cached[0] is t and cached[1] == t.data_ptr() and cached[2] == device:
            return cached[3]
        array = _array(t, device)
        cache[attr] = (t, t.data_ptr(), device, array)
        return array

    def forward(self, x: Any, residual: Any = None) -> Any:
        """Normalize ``x`` (see the class docstring); with ``act="relu"`` and / or a
        ``residual``, ``y = act(BN(x) + residual)`` in the same passes.

        Args:
            x: a ``paddle.Tensor`` of 2 to 5 dimensions in the layer's ``data_format``.
            residual: None, or a ``paddle.Tensor`` of ``x``'s shape, dtype and device added
                before the activation; it gets its gradient through Paddle's autograd.

        Returns:
            ``y``, a ``paddle.Tensor`` of ``x``'s shape and dtype.

        Raises:
            As the class docstring says, before any collective or write.
        """
        if not paddle.in_dynamic_mode():
            raise RuntimeError(f"{self.full_name()}: cusyncbn.paddle runs in dynamic-graph mode only (its passes "
                               "are Python calls, not Paddle operators)")
        if not isinstance(x, paddle.Tensor):
            raise TypeError(f"{self.full_name()}: x must be a paddle.Tensor, got {type(x).__name__}")
        if residual is not None:
            self._check_residual(residual, x)
        device = device_of(x)
        # Paddle's kernel: batch statistics unless use_global_stats (or eval with it unset);
        # batch statistics always update the running ones, in eval too.
        batch = self.training if self._use_global_stats is None else not self._use_global_stats
        param_array = self._param_array
        arrays = (param_array("_mean", device), param_array("_variance", device), param_array("weight", device),
                  param_array("bias", device))
        act = self._act
        fused = act if act == "relu" else None
        settings = _Settings(training=batch, momentum=self._momentum, epsilon=self._epsilon,
                             data_format=self._data_format, comm=self._comm, num_features=self._num_features,
                             device=device, where=self._where(), stats_dtype=self._mean.dtype, activation=fused)
        if paddle.is_grad_enabled() and not (x.stop_gradient and self.weight.stop_gradient
                                             and self.bias.stop_gradient
                                             and (residual is None or residual.stop_gradient)):
            y = _Function.apply(x, self.weight, self.bias, residual, arrays, settings)
        else:
            y, ctx, _ = _core_forward(x, residual, arrays, settings)
            ctx.release()                     # nothing will be back-propagated
        # Another activation of a converted paddle.nn.BatchNorm, applied as Paddle's dygraph_utils applies it.
        return y if act is None or fused is not None else getattr(_legacy_C_ops, act)(y)

    def _check_residual(self, residual: Any, x: Any) -> None:
        """``residual`` can be added to ``x`` as it is (no broadcast, no cast, same place)."""
        where = self._where()
        if not isinstance(residual, paddle.Tensor):
            raise TypeError(f"{where}: residual must be a paddle.Tensor (or None), got {type(residual).__name__}")
        if list(residual.shape) != list(x.shape):
            raise ValueError(f"{where}: residual has shape {list(residual.shape)}, expected x's {list(x.shape)} "
                             "(it is added to the normalized x element by element)")
        if residual.dtype != x.dtype:
            raise TypeError(f"{where}: residual has dtype {residual.dtype}, expected x's {x.dtype}")
        if device_of(residual) != device_of(x):
            raise ValueError(f"{where}: residual is on {device_of(residual)}, x on {device_of(x)}")

    @classmethod
    def convert_sync_batchnorm(cls, layer: Any, *, comm: Any = None) -> Any:
        """As ``paddle.nn.SyncBatchNorm.convert_sync_batchnorm``: see :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(layer, comm=comm)


_CONVERTED = (paddle.nn.BatchNorm1D, paddle.nn.BatchNorm2D, paddle.nn.BatchNorm3D, paddle.nn.SyncBatchNorm,
              paddle.nn.BatchNorm)


def _unnamed(attr: Any) -> Any:
    """``attr`` without its name: the new layer's own parameters are placeholders (replaced
    by the old layer's), and Paddle refuses a second parameter of the same name."""
    if isinstance(attr, paddle.ParamAttr) and attr.name is not None:
        attr = copy.copy(attr)
        attr.name = None
    return attr


# What the new layer keeps of its own: its identity (full name, helper) and the containers
# of its parameters and sublayers (the old layer's are added to them one by one). Every
# other instance attribute of the old layer moves over (see cusyncbn._convert.carry_state).
_OWN = ("_full_name", "_helper", "_op_recorder", "_parameters", "_sub_layers", "_comm", "_cusyncbn_arrays")
_TENSORS = ("weight", "bias", "_mean", "_variance")


def _replacement(old: Any, comm: Any) -> SyncBatchNorm:
    base = next(k for k in _CONVERTED if isinstance(old, k))
    if base is paddle.nn.BatchNorm:
        weight_attr, data_format, act = old._param_attr, old._data_layout, old._act
        # Paddle's kernel: running statistics when use_global_stats, else in eval unless
        # trainable_statistics; batch statistics otherwise.
        use_global = True if old._use_global_stats else (False if old._trainable_statistics else None)
        name = None
        if act is not None and not hasattr(_legacy_C_ops, act):
            raise ValueError(f"convert_sync_batchnorm: {old.full_name()} has act={act!r}, which Paddle has no "
                             "operator for; apply the activation as its own layer")
    else:
        weight_attr, data_format, act = old._weight_attr, old._data_format, None
        use_global, name = old._use_global_stats, old._name
    new = SyncBatchNorm(int(old._mean.shape[0]), old._momentum, old._epsilon, _unnamed(weight_attr),
                        _unnamed(old._bias_attr), data_format, None, comm=comm, use_global_stats=use_global)
    warn_lost_members(old, base, "convert_sync_batchnorm", old.full_name(), f"paddle.nn.{base.__name__}",
                      "cusyncbn.paddle.SyncBatchNorm")
    # Train/eval mode, dtype, hooks (the same dicts: their handles keep working), buffers,
    # attributes set by the user or by a subclass's __init__, ...
    carry_state(old, new, skip=_OWN + _TENSORS, share=[key for key in vars(old) if "hook" in key])
    # Set after construction: a name also names the running statistics (taken over below).
    new._name, new._weight_attr, new._bias_attr, new._data_format = name, weight_attr, old._bias_attr, data_format
    new._use_global_stats, new._act = use_global, act
    with paddle.no_grad():
        for attr in ("weight", "bias"):
            param = getattr(old, attr)
            if param is not None:
                setattr(new, attr, param)
                continue
            frozen = getattr(new, attr)          # frozen ones / zeros, as in the stats' dtype and place
            if frozen.dtype != old._mean.dtype or frozen.place != old._mean.place:
                value = paddle.full_like(old._mean, 1.0 if attr == "weight" else 0.0)
                setattr(new, attr, EagerParamBase.from_tensor(value, trainable=False, name=frozen.name))
        new._mean, new._variance = old._mean, old._variance
        for key, param in old._parameters.items():       # parameters added to the old layer
            if key not in _TENSORS and param is not None:
                new.add_parameter(key, param)
    for key, sublayer in old._sub_layers.items():
        if sublayer is not None:
            new.add_sublayer(key, sublayer)
    return new


def convert_sync_batchnorm(layer: Any, *, comm: Any = None) -> Any:
    """Replace every ``paddle.nn.BatchNorm1D/2D/3D``, ``paddle.nn.BatchNorm`` and
    ``paddle.nn.SyncBatchNorm`` in ``layer`` by :class:`SyncBatchNorm`.

    A new layer keeps everything of the one it replaces: its parameters and running
    statistics (the same tensors, as Paddle's converter does: dtype, place, trainability and
    optimizer attributes come with them), momentum, epsilon, data format, name, weight and
    bias attributes, ``use_global_stats`` (for ``paddle.nn.BatchNorm``: ``use_global_stats``
    and ``trainable_statistics`` as the mode they select, and ``act``: ``"relu"`` fused into
    the batch norm's passes, another activation applied after them), train/eval mode, and
    every other instance attribute: forward pre/post and state-dict hooks (their handles
    keep working), buffers, parameters and sublayers added to it, attributes set by the
    user. Paddle's own converter keeps only some of these. What a *subclass* defines in its
    class (e.g. its own ``forward``) cannot move to a :class:`SyncBatchNorm`: such a layer is
    converted with a ``UserWarning`` naming those members. As with Paddle's converter, the
    new layers take input of 2 to 5 dimensions whatever layer they replace. Layers that are
    already :class:`SyncBatchNorm` stay as they are (with a ``UserWarning`` when ``comm`` is
    given and theirs is another).

    The model is walked through its sublayers as Paddle's converter walks
    ``named_children()``, except that a layer registered under several names (or parents)
    is converted once and replaced under every name (``named_children()`` yields it only once).

    Args:
        layer: the model, or one batch-norm layer.
        comm: communicator of the new layers (see :class:`SyncBatchNorm`).

    Returns:
        The converted model (a new object when ``layer`` itself is a batch norm).

    Example:
        >>> import paddle, cusyncbn.paddle as cbp
        >>> model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 5, 3), paddle.nn.BatchNorm2D(5))
        >>> model = cbp.convert_sync_batchnorm(model)
        >>> type(model[1]).__name__
        'SyncBatchNorm'
    """
    return _convert(layer, comm, {})


def _convert(layer: Any, comm: Any, memo: dict, path: str = "") -> Any:
    if id(layer) in memo:
        return memo[id(layer)]
    if isinstance(layer, SyncBatchNorm):
        if comm is not None and layer._comm is not comm:
            warnings.warn(f"convert_sync_batchnorm: {layer.full_name()} is already a cusyncbn.paddle.SyncBatchNorm "
                          "and keeps its own communicator, not the comm= given", UserWarning,
                          stacklevel=user_stacklevel())
        memo[id(layer)] = layer
        return layer
    if isinstance(layer, _CONVERTED):
        memo[id(layer)] = new = _replacement(layer, comm)
        new.__dict__["_cusyncbn_path"] = path or None       # its name in the model, for messages
        return new
    memo[id(layer)] = layer
    for name, child in list(layer._sub_layers.items()):      # every name, shared layers included
        if child is not None:
            new = _convert(child, comm, memo, f"{path}.{name}" if path else name)
            if new is not child:
                layer.add_sublayer(name, new)
    return layer


def allreduce_gradients(parameters: Iterable[Any], comm: Any = None, op: str = "sum") -> None:
    """Sum (or average) the ``.grad`` of Paddle parameters over ranks, in place, in one collective.

    The data-parallel step for a model trained under ``mpirun`` without
    ``paddle.distributed``: after ``loss.backward()``, every parameter's gradient (the
    SyncBatchNorm layers' shares included) becomes the full gradient on every rank.

    Args:
        parameters: Paddle parameters, e.g. ``model.parameters()``; those without a
            gradient are skipped. All on one device.
        comm: as for :class:`SyncBatchNorm`.
        op: ``"sum"`` (each rank's loss is its part of a global sum) or ``"mean"``.

    Raises:
        ValueError: unknown ``op``.

    Example:
        >>> loss.backward(); cbp.allreduce_gradients(model.parameters()); opt.step()   # doctest: +SKIP
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    device = device_of(grads[0]) if grads else "cpu"
    with _on_paddle_stream(device):
        _allreduce_arrays([_array(g, device) for g in grads], comm, op)
