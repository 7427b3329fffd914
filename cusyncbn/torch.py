"""PyTorch drop-in: ``torch.nn.SyncBatchNorm`` / ``BatchNorm1d/2d/3d`` running on cusyncbn.

Importing this module imports torch (``import cusyncbn`` alone does not). The
module's autograd runs through cusyncbn's forward/backward on the CPU (NumPy) or
GPU (CuPy) backend, zero-copy through DLPack, and syncs through a cusyncbn
communicator: under ``mpirun`` over every MPI rank, with no ``torch.distributed``
set-up; under ``torchrun`` (torch.distributed initialised, no MPI launcher) over
torch.distributed's world, as torch's module; over ``process_group=`` or ``comm=`` when
given.

Example (``mpiexec -n 2 python train.py``)::

    import cusyncbn.torch as cbt
    model = cbt.convert_sync_batchnorm(model)      # every BatchNorm*d -> cbt.SyncBatchNorm
    loss.backward()
    cbt.allreduce_gradients(model.parameters())    # data parallel: the full gradients on every rank
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import warnings
from operator import methodcaller
from typing import Any, Iterable, NamedTuple

import torch

from . import _watchdog
from ._backend_factory import get_backend
from ._comm import SingleProcessComm
from ._comm_factory import resolve_comm
from ._rules import check_bool
from ._streams import external_stream
from .functional import sync_batch_norm, sync_batch_norm_backward

__all__ = ["InputChannelsError", "InputDtypeError", "SyncBatchNorm", "TorchDistComm", "allreduce_gradients",
           "convert_sync_batchnorm"]


class TorchDistComm:
    """A cusyncbn communicator over a ``torch.distributed`` process group.

    On CPU tensors (gloo) each all-reduce is watched as ``MPIComm``'s are: a stall report at
    half the timeout, the end of the job at the timeout (``cusyncbn._watchdog``); on CUDA
    tensors PyTorch's NCCL watchdog applies (``init_process_group(timeout=...)``).

    Args:
        group: the process group (default: the world group).
        timeout: seconds an all-reduce may take (None: :func:`cusyncbn.set_collective_timeout`,
            else ``CUSYNCBN_TIMEOUT``, else 600).
    """

    def __init__(self, group: Any = None, *, timeout: float | None = None) -> None:
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("TorchDistComm needs torch.distributed.init_process_group() first")
        self._dist, self.group = dist, group
        self.timeout = None if timeout is None else _watchdog.check_timeout(timeout, "TorchDistComm")
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def allreduce(self, buf: Any) -> None:
        tensor = torch.from_dlpack(buf)
        if tensor.is_cuda:                   # NCCL: PyTorch's own watchdog (init_process_group(timeout=))
            self._dist.all_reduce(tensor, group=self.group)
            return
        work = self._dist.all_reduce(tensor, group=self.group, async_op=True)
        _watchdog.wait(_WorkRequest(work), None, self, self.timeout)

    def __repr__(self) -> str:
        return f"TorchDistComm(rank={self.rank}, size={self.size})"


def _cuda_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _device_name(t: torch.Tensor) -> str:
    if t.device.type == "cuda":
        return f"gpu:{_cuda_index(t)}"
    if t.device.type == "cpu":
        return "cpu"
    raise ValueError(f"cusyncbn.torch supports CPU and CUDA tensors, got a tensor on {t.device}")


class _WorkRequest:
    """A ``torch.distributed`` work handle seen as an MPI request (``Test``) by the watchdog."""

    __slots__ = ("_work",)

    def __init__(self, work: Any) -> None:
        self._work = work

    def Test(self) -> bool:  # noqa: N802 (MPI's name)
        return bool(self._work.is_completed())


def _layout(t: torch.Tensor) -> tuple:
    """What a planned call keys a tensor's layout on: its strides and CUDA device index."""
    return t.stride(), t.get_device()


def _on_torch_stream(t: torch.Tensor) -> Any:
    """Context in which CuPy's current stream is torch's current stream on ``t``'s device.

    The kernels then queue behind torch's own work with no cross-stream event, and a
    ``torch.cuda.graph`` capture records them. A no-op for CPU tensors.
    """
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    index = _cuda_index(t)
    return external_stream(index, torch.cuda.current_stream(index).cuda_stream)


class _Settings(NamedTuple):
    """The plain settings of one pass, read by the autograd function by name (built per call
    by :meth:`SyncBatchNorm.forward`, never holding the module)."""

    training: bool                 # batch statistics or not
    momentum: float                # Paddle's convention: 1 - torch's
    epsilon: float
    data_format: str               # the functional core's data format
    comm: Any                      # the communicator
    plan_device: str | None        # the device that lets repeated calls take their planned path (None: none)
    name: str                      # the module's name in messages
    activation: str | None         # the epilogue's activation: None, or "relu" for fuse_relu


def _core_forward(x: torch.Tensor, z: torch.Tensor | None, arrays: tuple, settings: _Settings) -> tuple:
    """``(y, ctx)``: one call of the functional core's forward on ``x``.

    Args:
        x: the input as the core takes it (a detached tensor, channel-second contiguous or
            a channel-last permutation of a ``channels_last`` tensor).
        z: None, or the residual added before the activation (a detached tensor of ``x``'s
            shape and dtype, laid out as ``x``).
        arrays: ``(running_mean, running_var, weight, bias)``: NumPy / CuPy arrays sharing
            the memory of the module's tensors, or None; the running statistics are updated
            in place.
        settings: the pass's :class:`_Settings`.

    Returns:
        ``y`` (a tensor like ``x``) and the functional core's context for the backward.
    """
    # On a GPU the outputs come from torch's allocator and are written in place (no CuPy
    # allocation, no DLPack export per call); repeated calls take the planned path.
    out = torch.empty_like(x) if x.is_cuda else None
    with _on_torch_stream(x):
        y, core = sync_batch_norm(
            x, *arrays, training=settings.training, momentum=settings.momentum, epsilon=settings.epsilon,
            data_format=settings.data_format, comm=settings.comm, unbiased_running_var=True,
            device=settings.plan_device, name=settings.name, out=out, activation=settings.activation, residual=z)
    return (out if out is not None else torch.from_dlpack(y)), core


class _Function(torch.autograd.Function):
    """One call of the functional core per pass, as torch's ``_functions.SyncBatchNorm``:
    tensors and plain settings in (see :func:`_core_forward`), never the module; dx and the
    backward all-reduce only when the input needs a gradient. With the fused epilogue (as
    Apex's optimized ``SyncBatchnormFunction`` with ``z`` and ``fuse_relu``) ``z``'s gradient
    comes back too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, z: Any, arrays: tuple,
                settings: _Settings) -> torch.Tensor:
        y, ctx.core = _core_forward(x.detach(), None if z is None else z.detach(), arrays, settings)
        ctx.params = (weight, bias)
        ctx.fused = settings.activation is not None
        if ctx.fused:
            # The backward reads the ReLU mask from y: y is saved as torch.relu saves its
            # output, so that a backward after an in-place change of y raises torch's error.
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        need_x, need_w, need_b, need_z = ctx.needs_input_grad[:4]
        if ctx.fused:
            _ = ctx.saved_tensors              # torch's check that y was not modified in place
        weight, bias = ctx.params
        dy = dy.detach().contiguous()
        outs: dict = {}
        if dy.is_cuda:
            if need_x:
                outs["input_grad_out"] = torch.empty_like(dy)
            if need_w and weight is not None:
                outs["weight_grad_out"] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
            if need_b and bias is not None:
                outs["bias_grad_out"] = torch.zeros_like(bias, memory_format=torch.contiguous_format)
            if need_z:
                outs["residual_grad_out"] = torch.empty_like(dy)
        with _on_torch_stream(dy):
            # dy has the shape of the forward's (possibly channel-last permuted) input; the
            # permutes around this function are differentiated by autograd itself.
            grads = sync_batch_norm_backward(ctx.core, dy, input_grad=need_x, weight_grad=need_w, bias_grad=need_b,
                                             residual_grad=need_z, **outs)
            grads = tuple(None if g is None else g if isinstance(g, torch.Tensor) else torch.from_dlpack(g)
                          for g in grads)
        ctx.core = ctx.params = None
        # (dx, dweight, dbias[, dz]) and nothing for z (when None), the arrays and the settings.
        return grads + (None, None) if len(grads) == 4 else grads + (None, None, None)


# (input rank, channels last) -> data format of the functional core.
_FORMATS = {(2, False): "NC", (3, False): "NCL", (4, False): "NCHW", (5, False): "NCDHW",
            (4, True): "NHWC", (5, True): "NDHWC"}
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_PARAM_DTYPES = (torch.float32, torch.float64)
_LOCAL = SingleProcessComm()                       # the no-sync passes' communicator (one id: plans key on it)
_HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.SyncBatchNorm.__init__).parameters    # torch >= 2.6
_serials = itertools.count(1)


def _is_channels_last(x: torch.Tensor) -> bool:
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


def _to_channel_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, *range(2, x.dim()), 1)


def _from_channel_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))


class InputChannelsError(RuntimeError, ValueError):
    """An input whose channel count is not the module's ``num_features``: a ``RuntimeError``
    as torch raises for it, and a ``ValueError`` as cusyncbn's checks raise."""


class InputDtypeError(NotImplementedError, TypeError):
    """A non-floating input: a ``NotImplementedError`` as torch raises for it, and a
    ``TypeError`` as cusyncbn's checks raise."""


_dist_comms: dict[str, TorchDistComm] = {}


def _dist_world(device: str) -> TorchDistComm | None:
    """A communicator over torch.distributed's world group when it is initialised with more
    than one process (``torchrun``): where ``torch.nn.SyncBatchNorm`` syncs by default."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    comm = _dist_comms.get(device)
    if comm is None:
        if dist.get_world_size() <= 1:
            return None
        comm = _dist_comms[device] = TorchDistComm()
    return comm


def _default_comm(comm: Any, device: str) -> tuple[Any, bool]:
    """``(communicator, provisional)`` for a ``comm=`` argument: None means every MPI rank
    when launched by MPI, else torch.distributed's world when it is initialised (as torch's
    module), else this process alone (provisional: torch.distributed may start later)."""
    resolved = resolve_comm(comm, device)
    if comm is None and resolved.size == 1:
        world = _dist_world(device)
        if world is not None:
            return world, False
        return resolved, True
    return resolved, False


def _import(t: torch.Tensor, device: str) -> Any:
    """The NumPy / CuPy array sharing ``t``'s memory."""
    data = t.detach()
    if device == "cpu":
        return data.numpy()
    import cupy
    return cupy.from_dlpack(data)


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` (and ``BatchNorm1d/2d/3d``) computed and synced by cusyncbn.

    A subclass of ``torch.nn.SyncBatchNorm``: same constructor, parameters, buffers,
    state-dict keys and versions, hooks and ``isinstance`` checks (``_BatchNorm``), and its
    forward makes torch's decisions, reading the attributes at call time: training
    normalizes with the batch statistics (synced over the communicator), updates the
    running ones when ``track_running_stats`` (torch's momentum convention, unbiased
    running variance, ``momentum=None`` for a cumulative average over
    ``num_batches_tracked``); eval uses the running statistics, or, when the module keeps
    none, this rank's own batch, with no collective either way. It differs from torch only
    where cusyncbn is exact: uneven and empty per-rank batches give the statistics of the
    whole batch; the running variance of a global batch of one value stays finite; a
    failing call changes no state (torch's has already counted it in
    ``num_batches_tracked``) and a wrong channel count blames the input.

    Input of 2 or more dimensions, channel second (``channels_last`` tensors without a
    copy), float16 / bfloat16 / float32 / float64 (16-bit inputs are computed in float32 on
    the CPU, as torch does); parameters and buffers float32 or float64 (16-bit ones are
    computed in float32 copies, written back).

    The fused epilogue of Apex's optimized SyncBatchNorm (``apex.parallel.SyncBatchNorm``
    with ``fuse_relu`` and ``forward(input, z)``): ``forward(input, z)`` returns
    ``BN(input) + z``, and with ``fuse_relu=True`` ``relu(BN(input) + z)`` (``z`` optional),
    in the passes of the batch norm itself (no separate add and ReLU reading and writing
    the tensor again, forward and backward), in every mode and layout, on the CPU and on
    CUDA; ``z`` gets its gradient through autograd. The backward reads the ReLU mask from
    the output, as ``torch.relu``'s does: modifying the output in place before the backward
    raises torch's error. With the defaults (``fuse_relu=False``, no ``z``) the module is
    torch's: ``fuse_relu`` shows in its ``repr`` only when set, and never in its state dict.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device,
            dtype, bias: as torch's (``bias`` needs torch >= 2.6 there; here any torch).
        comm: a cusyncbn or mpi4py communicator. Default: all MPI ranks when launched by
            MPI, else torch.distributed's world when it is initialised, else none.
            ``process_group`` (a torch.distributed group) takes precedence.
        sync: False makes it a local batch norm (torch's ``BatchNorm*d``).
        fuse_relu: apply ReLU after the batch norm (and after the add of ``z``) in its own
            passes, as Apex's ``fuse_relu``. Read at call time, like torch's attributes (a
            value other than True or False is a ``TypeError`` at construction and at forward).

    Raises (at forward, before any state change or collective):
        ValueError: fewer than 2 dimensions, no channels, one value per channel in a
            batch normalized without syncing (torch's rule and message), ``eps`` out of range.
        InputChannelsError: channel count not ``num_features`` (a RuntimeError, as torch's).
        InputDtypeError: a non-floating input (a NotImplementedError, as torch's).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None,
                 dtype: Any = None, *, bias: bool = True, comm: Any = None, sync: bool = True,
                 fuse_relu: bool = False) -> None:
        extra = {"bias": bias} if _HAS_BIAS_ARG else {}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         **extra)
        if not bias and not _HAS_BIAS_ARG and affine:
            self.register_parameter("bias", None)
        self.sync = sync
        self.fuse_relu = check_bool(fuse_relu, "fuse_relu", "cusyncbn.torch.SyncBatchNorm")
        self._comm_arg = comm
        self._comms: dict[str, tuple] = {}
        self._views: dict[str, tuple] = {}
        self._cusyncbn_label: str | None = None
        self._cusyncbn_serial = next(_serials)
        self._cusyncbn_name = self._make_name()

    # -- naming, pickling ----------------------------------------------------------------

    def _make_name(self) -> str:
        """This module's name in messages and its key for once-per-layer warnings:
        ``SyncBatchNorm#<serial>``, plus its path in the model when the converter made it."""
        label = f" ({self._cusyncbn_label})" if self._cusyncbn_label else ""
        return f"SyncBatchNorm#{self._cusyncbn_serial}{label}"

    def _set_label(self, label: str | None) -> None:
        self._cusyncbn_label = label or None
        self._cusyncbn_name = self._make_name()

    def __getstate__(self) -> dict:
        # Caches of imported arrays and communicators are this process's: never pickled
        # (torch.save) or deep-copied into another module.
        state = dict(self.__dict__)
        state["_comms"], state["_views"] = {}, {}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fuse_relu", False)          # pickled before the fused epilogue
        self._cusyncbn_serial = next(_serials)             # a copy is another module: warns for itself
        self._cusyncbn_name = self._make_name()

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fuse_relu=True" if self.fuse_relu else "") + ", backend=cusyncbn"

    # -- communicator and per-channel arrays ---------------------------------------------

    def _sync_comm(self, device: str) -> Any:
        """The communicator a training forward syncs over, read from ``sync``,
        ``process_group`` and ``comm`` as they are now."""
        group, arg, sync = self.process_group, self._comm_arg, self.sync
        cached = self._comms.get(device)
        if cached is not None and cached[0] is group and cached[1] is arg and cached[2] == sync and not cached[4]:
            return cached[3]
        if device != "cpu":
            # Planned calls may then take this module's CUDA tensors as they are (the calls
            # run on torch's current stream: see _on_torch_stream).
            get_backend(device).accept_array_type(torch.Tensor, methodcaller("data_ptr"), _layout)
        provisional = False
        if not sync:
            comm = _LOCAL
        elif group is not None:
            comm = TorchDistComm(group)
        else:
            comm, provisional = _default_comm(arg, device)
        self._comms[device] = (group, arg, sync, comm, provisional)
        return comm

    def _array(self, attr: str, t: torch.Tensor, device: str) -> Any:
        """The NumPy / CuPy array sharing the memory of ``t``, this module's tensor ``attr``,
        imported through DLPack once and reused while the tensor is the same: planned calls
        key on the arrays' identities."""
        cached = self._views.get(attr)
        if cached is not None and cached[0] is t and cached[1] == t.data_ptr():
            return cached[2]
        array = _import(t, device)
        self._views[attr] = (t, t.data_ptr(), array)
        return array

    # -- forward ---------------------------------------------------------------------------

    def forward(self, input: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``input`` as torch's ``SyncBatchNorm.forward`` does, computed (and in
        training over several processes, synchronized) by cusyncbn; see the class docstring
        for the decisions it makes. With ``z`` and / or ``fuse_relu``, the fused epilogue of
        Apex's optimized SyncBatchNorm: ``BN(input) + z``, and ``relu(...)`` of it with
        ``fuse_relu``.

        Args:
            input: ``(N, C, *)``, at least 2 dimensions (more than 5 are viewed as
                ``(N, C, L)``), ``C == num_features`` (unless the module has no parameters
                and no running statistics); float16, bfloat16, float32 or float64, on the
                CPU or a CUDA device, where the module's parameters and buffers must be. A
                ``channels_last`` (``channels_last_3d``) tensor is taken without a copy; on
                a CUDA device the kernels run on torch's current stream.
            z: None, or a tensor added to the normalized input before the ReLU (the residual
                of a residual block): ``input``'s shape, dtype and device, any memory format.

        Returns:
            The normalized tensor: ``input``'s shape, dtype, device and memory format. It is
            differentiable w.r.t. ``input``, ``weight``, ``bias`` and ``z``; the backward makes one
            all-reduce when ``input`` needs a gradient after a synchronized forward, and
            leaves this rank's shares in ``weight.grad`` / ``bias.grad`` (see
            :func:`allreduce_gradients`).

        Raises (before any state change or collective):
            ValueError: fewer than 2 dimensions or no channels (torch's messages); one value
                per channel in a training batch normalized without syncing (torch's rule);
                ``eps`` not positive in training or negative; a device other than the CPU
                or CUDA.
            InputChannelsError: ``C`` is not ``num_features`` (a ``RuntimeError`` too).
            InputDtypeError: a non-floating input (a ``NotImplementedError`` too).
            TypeError: a ``comm`` that is not a communicator; ``z`` not a tensor, or of
                another dtype than ``input``; ``fuse_relu`` not True or False.
            ValueError: ``z`` of another shape than ``input``, or on another device.
        """
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if not input.is_floating_point():
            raise InputDtypeError(f"{self._cusyncbn_name}: input has dtype {input.dtype}; batch norm takes float16, "
                                  "bfloat16, float32 or float64 input")
        fuse = self.fuse_relu
        if fuse is not False and fuse is not True:
            fuse = check_bool(fuse, "fuse_relu", self._cusyncbn_name)
        if z is not None:
            self._check_z(z, input)
        device = _device_name(input)
        training = self.training
        # As torch: the running statistics are passed when they are used (eval) or updated
        # (training and tracked); batch statistics in training, and in eval when there are none.
        running_mean, running_var = self.running_mean, self.running_var
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        weight, bias = self.weight, self.bias
        channels = input.shape[1]
        if channels != self.num_features and not (weight is None and bias is None and running_mean is None
                                                  and running_var is None):
            raise InputChannelsError(
                f"{self._cusyncbn_name}: input of shape {tuple(input.shape)} has {channels} channels (dimension 1), "
                f"expected num_features={self.num_features}")
        eps = self.eps
        if bn_training and eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        if eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        comm = self._sync_comm(device)
        # As torch: sync only a training forward, and only over more than one process.
        sync = bn_training and training and comm.size > 1
        if not sync:
            comm = _LOCAL
            if bn_training and input.numel() == channels:          # torch's rule: one value per channel
                raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                 f"{input.size()}")
        # (torch's sync path checks the batch size only when its world has fewer than 2
        # processes, that is never: over several ranks a global batch of one value per
        # channel gives y = bias, as torch's, and a running variance updated with the biased
        # 0 where torch's turns non-finite.)
        factor = 0.0 if self.momentum is None else self.momentum
        tracked = None
        if training and self.track_running_stats:
            tracked = self.num_batches_tracked
            if tracked is None:
                raise AssertionError("num_batches_tracked must not be None")
            tracked.add_(1)
            if self.momentum is None:                    # cumulative moving average
                factor = 1.0 / tracked.item()
        try:
            return self._run(input, weight, bias, running_mean, running_var, bn_training, 1.0 - factor, comm,
                             device, z, "relu" if fuse else None)
        except BaseException:
            if tracked is not None:                  # the functional core changes nothing when it raises
                tracked.sub_(1)
            raise

    def _check_z(self, z: Any, input: torch.Tensor) -> None:
        """``z`` is a tensor that can be added to ``input`` as it is (no broadcast, no cast)."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{self._cusyncbn_name}: z must be a torch.Tensor (or None), got {type(z).__name__}")
        if z.shape != input.shape:
            raise ValueError(f"{self._cusyncbn_name}: z has shape {tuple(z.shape)}, expected the input's "
                             f"{tuple(input.shape)} (z is added to the normalized input element by element)")
        if z.dtype != input.dtype:
            raise TypeError(f"{self._cusyncbn_name}: z has dtype {z.dtype}, expected the input's {input.dtype}")
        if z.device != input.device:
            raise ValueError(f"{self._cusyncbn_name}: z is on {z.device}, the input on {input.device}")

    def _run(self, input: torch.Tensor, weight: Any, bias: Any, running_mean: Any, running_var: Any,
             training: bool, momentum: float, comm: Any, device: str, z: Any = None,
             activation: str | None = None) -> torch.Tensor:
        x = input
        low = None
        if device == "cpu" and x.dtype in _LOW_PRECISION:
            # NumPy has no bfloat16, and torch's CPU kernels compute 16-bit input in float32.
            low, x = x.dtype, x.float()
            if z is not None:
                z = z.float()
        ndim = x.dim()
        zin = z                                # z laid out as x is given to the core (a copy where needed)
        if _is_channels_last(x):
            xin, data_format, back = _to_channel_last(x), _FORMATS[(ndim, True)], _from_channel_last
            if z is not None:
                zin = _to_channel_last(z)
        elif ndim > 5:
            shape = x.shape
            xin, data_format, back = x.contiguous().view(shape[0], shape[1], -1), "NCL", methodcaller("view", shape)
            if z is not None:
                zin = z.reshape(shape[0], shape[1], -1)
        else:
            xin, data_format, back = x.contiguous(), _FORMATS[(ndim, False)], None
        copies = None
        if ((running_mean is None or running_mean.dtype in _PARAM_DTYPES)
                and (running_var is None or running_var.dtype in _PARAM_DTYPES)
                and (weight is None or weight.dtype in _PARAM_DTYPES)
                and (bias is None or bias.dtype in _PARAM_DTYPES)):
            array = self._array
            arrays = (None if running_mean is None else array("running_mean", running_mean, device),
                      None if running_var is None else array("running_var", running_var, device),
                      None if weight is None else array("weight", weight, device),
                      None if bias is None else array("bias", bias, device))
            plan_device = device
        else:
            tensors = (running_mean, running_var, weight, bias)
            # 16-bit parameters or buffers: float32 copies (the parameters' through autograd,
            # so their gradients come back in their dtype); no planned path for these.
            copies = tuple(None if t is None else t.float() for t in tensors)
            weight, bias = copies[2:]
            arrays = tuple(None if t is None else _import(t, device) for t in copies)
            plan_device = None
        settings = _Settings(training=training, momentum=momentum, epsilon=float(self.eps), data_format=data_format,
                             comm=comm, plan_device=plan_device, name=self._cusyncbn_name, activation=activation)
        if torch.is_grad_enabled() and (xin.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)
                                        or (zin is not None and zin.requires_grad)):
            y = _Function.apply(xin, weight, bias, zin, arrays, settings)
        else:
            y, core = _core_forward(xin.detach(), None if zin is None else zin.detach(), arrays, settings)
            core.release()                           # nothing will be back-propagated
        if copies is not None:
            for t, f in zip((running_mean, running_var), copies[:2]):
                if t is not None and f is not t:
                    t.copy_(f)
        if back is not None:
            y = back(y)
        return y if low is None else y.to(low)

    def _take_over(self, old: torch.nn.Module) -> None:
        """Make this new module ``old``'s replacement: its parameters and buffers (the same
        tensors), buffer persistence, training mode, hooks and every other attribute."""
        fresh = set(self.__dict__)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(self, name, getattr(old, name))
        self._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
        self.training = old.training
        mine, theirs = self.__dict__, old.__dict__
        hooks = [key for key, value in theirs.items() if "hooks" in key and isinstance(value, dict)]
        if any(theirs[key] for key in hooks):
            # The same dicts: the hooks run on this module and their handles still remove them.
            for key in hooks:
                table = mine[key] = theirs[key]
                for hook_id, hook in list(table.items()):
                    if getattr(hook, "with_module", False) and hook.module() is old:
                        table[hook_id] = type(hook)(hook.hook, self)     # bound to the module: rebind
            self._is_full_backward_hook = old._is_full_backward_hook
        for key, value in theirs.items():                   # qconfig, and whatever else was set on it
            if key not in fresh:
                mine[key] = value

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None, *,
                               comm: Any = None) -> torch.nn.Module:
        """As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: see :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group, comm=comm)


# -- the converter -------------------------------------------------------------------------

_TORCH_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
                      torch.nn.modules.batchnorm._BatchNorm)


def convert_sync_batchnorm(module: torch.nn.Module, process_group: Any = None, *, comm: Any = None) -> torch.nn.Module:
    """Replace every batch norm of ``module`` (any ``torch.nn.modules.batchnorm._BatchNorm``:
    ``BatchNorm1d/2d/3d``, torch's ``SyncBatchNorm``) by :class:`SyncBatchNorm`.

    As torch's own converter: the new module takes over the old one's parameters and buffers
    (the same tensors: device, dtype, ``requires_grad`` and optimizer state stay), ``eps``,
    ``momentum`` (None too), ``affine``, ``bias``, ``track_running_stats``, training mode,
    ``qconfig`` and children. Beyond it, nothing is dropped: every other attribute set on
    the old module, its hooks (forward, pre-forward, backward, state-dict; the handles keep
    working), non-persistent buffers and, without ``process_group`` / ``comm`` arguments,
    the ``process_group`` of a torch ``SyncBatchNorm``; a module shared under several
    names or parents is converted once and replaced everywhere. What cannot be carried
    over is said: a subclass's own methods (a warning), parametrizations and lazy modules
    not yet initialised (a ``ValueError``).

    Args:
        module: the model (or a single batch-norm module).
        process_group: a torch.distributed group to sync over (see :class:`SyncBatchNorm`).
        comm: communicator of the new modules (see :class:`SyncBatchNorm`).

    Returns:
        The converted module (a new object when ``module`` itself is a batch norm).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = convert_sync_batchnorm(model)
        >>> isinstance(model[1], torch.nn.SyncBatchNorm), type(model[1]).__module__
        (True, 'cusyncbn.torch')
    """
    root = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        root = _replacement(module, process_group, comm, "")
    made: dict[int, torch.nn.Module] = {id(module): root}
    # Every place a module sits, shared ones under each of their names (named_children()
    # yields a shared child once, and torch's converter leaves its other names unconverted).
    for path, child in list(root.named_modules(remove_duplicate=False)):
        if not path or not isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(child, SyncBatchNorm):
            if child._cusyncbn_label is None:
                child._set_label(path)
            continue
        new = made.get(id(child))
        if new is None:
            new = made[id(child)] = _replacement(child, process_group, comm, path)
        parent, _, name = path.rpartition(".")
        root.get_submodule(parent).add_module(name, new)
    return root


def _replacement(old: torch.nn.modules.batchnorm._BatchNorm, group: Any, comm: Any, path: str) -> SyncBatchNorm:
    """The :class:`SyncBatchNorm` taking ``old``'s place (and its children, as they are)."""
    where = f"convert_sync_batchnorm: {path or 'the module'} ({type(old).__name__})"
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(old):
        raise ValueError(f"{where} has parametrizations ({', '.join(old.parametrizations)}), which cannot be carried "
                         "over: convert before parametrizing, or remove them first "
                         "(torch.nn.utils.parametrize.remove_parametrizations)")
    if isinstance(old, torch.nn.modules.lazy.LazyModuleMixin) and old.has_uninitialized_params():
        raise ValueError(f"{where} is a lazy module not yet initialised (num_features unknown): run one forward "
                         "before converting")
    own = _own_methods(type(old))
    if own:
        warnings.warn(f"{where} is a subclass of torch's batch norm with its own {', '.join(own)}, which "
                      "cusyncbn.torch.SyncBatchNorm does not carry over: it computes torch.nn.SyncBatchNorm's "
                      "forward", UserWarning, stacklevel=3)
    old_group = getattr(old, "process_group", None)
    if group is None and old_group is not None:
        if comm is None:
            group = old_group
        else:
            warnings.warn(f"{where} synced over process_group={old_group!r}; the converter's comm={comm!r} takes "
                          "its place", UserWarning, stacklevel=3)
    new = SyncBatchNorm(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, group,
                        device="meta", bias=old.bias is not None, comm=comm)
    new._take_over(old)
    new._set_label(path)
    for name, child in old.named_modules(remove_duplicate=False):     # as torch's converter: children move over
        if name and "." not in name:
            new.add_module(name, child)
    return new


def _own_methods(cls: type) -> list[str]:
    """Methods a batch-norm subclass defines itself (between it and torch's classes)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass in _TORCH_BATCH_NORMS or klass.__module__.startswith("torch."):
            break
        names += [k for k, v in vars(klass).items() if callable(v) and k not in ("__init__",) and k not in names]
    return names


def allreduce_gradients(parameters: Iterable[Any], comm: Any = None, op: str = "sum") -> None:
    """Sum (or average) the ``.grad`` of torch parameters over ranks, in place, in one collective.

    The data-parallel step for a model trained under ``mpirun`` without
    ``torch.distributed``: after ``loss.backward()``, every parameter's gradient (the
    SyncBatchNorm modules' shares included) becomes the full gradient on every rank.
    ``cusyncbn.allreduce_gradients`` comes here when given torch tensors.

    Args:
        parameters: torch parameters, e.g. ``model.parameters()`` (a tensor that requires a
            gradient, or a ``Parameter``, stands for its ``.grad``; those without one are
            skipped; any other tensor is reduced itself). All on one device; every rank
            must pass the same ones.
        comm: as for :class:`SyncBatchNorm`.
        op: ``"sum"`` (each rank's loss is its part of a global sum) or ``"mean"``.

    Raises:
        ValueError: unknown ``op``; tensors on several devices.
        TypeError: something not a torch tensor; a sparse gradient.

    Example:
        >>> loss.backward(); cbt.allreduce_gradients(model.parameters()); opt.step()   # doctest: +SKIP
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
    grads = []
    for p in parameters:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"cusyncbn.torch.allreduce_gradients: expected torch tensors, got {type(p).__name__}")
        g = p.grad if (p.requires_grad or isinstance(p, torch.nn.Parameter)) else p
        if g is None:
            continue
        if g.layout != torch.strided:
            raise TypeError(f"cusyncbn.torch.allreduce_gradients: a {g.layout} gradient cannot be reduced in place")
        grads.append(g)
    if not grads:
        return
    if len({g.device for g in grads}) > 1:
        raise ValueError(f"cusyncbn.torch.allreduce_gradients: tensors on several devices "
                         f"{sorted({str(g.device) for g in grads})}")
    device = _device_name(grads[0])
    comm, _ = _default_comm(comm, device)
    with torch.no_grad(), _on_torch_stream(grads[0]):
        flat = torch.cat([g.detach().reshape(-1).to(torch.float64) for g in grads])
        comm.allreduce(_import(flat, device))
        if op == "mean":
            flat /= comm.size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view(g.shape))
            offset += g.numel()
