"""PyTorch drop-in: ``torch.nn.SyncBatchNorm`` / ``BatchNorm1d/2d/3d`` running on cusyncbn.

Importing this module imports torch (``import cusyncbn`` alone does not). The
module's autograd runs through cusyncbn's forward/backward on the CPU (NumPy) or
GPU (CuPy) backend, zero-copy through DLPack, and syncs through a cusyncbn
communicator: under ``mpirun`` it needs no ``torch.distributed`` set-up; when a
``process_group`` is given, that torch.distributed group is used instead.

Example (``mpiexec -n 2 python train.py``)::

    import cusyncbn.torch as cbt
    model = cbt.convert_sync_batchnorm(model)      # every BatchNorm*d -> cbt.SyncBatchNorm
"""
from __future__ import annotations

import contextlib
from operator import methodcaller
from typing import Any

import torch

from . import _watchdog
from ._backend import get_backend
from ._comm import SingleProcessComm, resolve_comm
from .functional import sync_batch_norm, sync_batch_norm_backward

__all__ = ["SyncBatchNorm", "TorchDistComm", "convert_sync_batchnorm"]


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


_cupy_streams: dict[tuple[int, int], Any] = {}


def _on_torch_stream(t: torch.Tensor) -> Any:
    """Context in which CuPy's current stream is torch's current stream on ``t``'s device.

    The kernels then queue behind torch's own work with no cross-stream event, and a
    ``torch.cuda.graph`` capture records them. A no-op for CPU tensors.
    """
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    import cupy
    index = _cuda_index(t)
    ptr = torch.cuda.current_stream(index).cuda_stream
    stream = _cupy_streams.get((index, ptr))
    if stream is None:
        if len(_cupy_streams) > 64:
            _cupy_streams.clear()
        stream = _cupy_streams[(index, ptr)] = cupy.cuda.ExternalStream(ptr, index)
    return stream


class _Function(torch.autograd.Function):
    """One call of the functional core per pass; dx and the backward all-reduce only when
    the input needs a gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, module: "SyncBatchNorm", training: bool,
                momentum: float, data_format: str) -> torch.Tensor:
        device = _device_name(x)
        comm = module._comm_for(device)
        x = x.detach()
        # On a GPU the outputs come from torch's allocator and are written in place (no CuPy
        # allocation, no DLPack export per call); repeated calls take the planned path.
        out = torch.empty_like(x) if x.is_cuda else None
        ctx.params = (weight, bias)
        with _on_torch_stream(x):
            y, ctx.core = sync_batch_norm(
                x, module._array("running_mean", device), module._array("running_var", device),
                module._array("weight", device), module._array("bias", device), training=training,
                momentum=momentum, epsilon=float(module.eps), data_format=data_format, comm=comm,
                unbiased_running_var=True, device=device, name=type(module).__name__, out=out)
        return out if out is not None else torch.from_dlpack(y)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
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
        with _on_torch_stream(dy):
            # dy has the shape of the forward's (possibly channel-last permuted) input; the
            # permutes around this function are differentiated by autograd itself.
            grads = sync_batch_norm_backward(ctx.core, dy, input_grad=need_x, weight_grad=need_w, bias_grad=need_b,
                                             **outs)
            grads = tuple(None if g is None else g if isinstance(g, torch.Tensor) else torch.from_dlpack(g)
                          for g in grads)
        ctx.core = ctx.params = None
        return grads + (None, None, None, None)


# (input rank, channels last) -> data format of the functional core.
_FORMATS = {(2, False): "NC", (3, False): "NCL", (4, False): "NCHW", (5, False): "NCDHW",
            (4, True): "NHWC", (5, True): "NDHWC"}


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


class SyncBatchNorm(torch.nn.Module):
    """Drop-in for ``torch.nn.SyncBatchNorm`` (and ``BatchNorm1d/2d/3d``) backed by cusyncbn.

    Same constructor and numerics as torch's: ``momentum`` in torch's convention
    (``running = (1 - momentum) * running + momentum * batch``), ``momentum=None`` for a
    cumulative average, unbiased running variance, ``num_batches_tracked``,
    ``affine`` and ``track_running_stats``. Input of 2 to 5 dimensions, channel second
    (``channels_last`` tensors are handled without a copy).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as torch.
        process_group: a torch.distributed group to sync over (optional).
        comm: a cusyncbn communicator or mpi4py communicator (default: all MPI ranks
            when launched by MPI, else none).
        sync: False makes it a local batch norm (torch's BatchNorm*d).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None,
                 dtype: Any = None, *, comm: Any = None, sync: bool = True) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.process_group = process_group
        self.sync = sync
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_features, **factory))
            self.bias = torch.nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._comm_arg = comm
        self._comms: dict[str, Any] = {}
        self._views: dict[str, tuple] = {}

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, backend=cusyncbn")

    def _comm_for(self, device: str) -> Any:
        comm = self._comms.get(device)
        if comm is None:
            if device != "cpu":
                # Planned calls may then take this module's CUDA tensors as they are (the calls
                # run on torch's current stream: see _on_torch_stream).
                get_backend(device).accept_array_type(torch.Tensor, methodcaller("data_ptr"), _layout)
            if not self.sync:
                comm = SingleProcessComm()
            elif self.process_group is not None:
                comm = TorchDistComm(self.process_group)
            else:
                comm = resolve_comm(self._comm_arg, device)
            self._comms[device] = comm
        return comm

    def _array(self, attr: str, device: str) -> Any:
        """The NumPy / CuPy array sharing the memory of this module's tensor ``attr`` (None
        when it has none), imported through DLPack once and reused while the tensor is the same."""
        t = getattr(self, attr)
        if t is None:
            return None
        cached = self._views.get(attr)
        if cached is not None and cached[0] is t and cached[1] == t.data_ptr():
            return cached[2]
        data = t.detach()
        if device == "cpu":
            array = data.numpy()
        else:
            import cupy
            array = cupy.from_dlpack(data)
        self._views[attr] = (t, t.data_ptr(), array)
        return array

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2D to 5D input (got {x.dim()}D input)")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:                    # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        # As torch: batch statistics in training, and in eval when no running ones are kept.
        training = self.training or self.running_mean is None
        channel_last = _is_channels_last(x)
        xin = _to_channel_last(x) if channel_last else x.contiguous()
        data_format = _FORMATS[(x.dim(), channel_last)]
        y = _Function.apply(xin, self.weight, self.bias, self, training, 1.0 - momentum, data_format)
        return _from_channel_last(y) if channel_last else y

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None, *,
                               comm: Any = None) -> torch.nn.Module:
        """As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: see :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group, comm=comm)


def convert_sync_batchnorm(module: torch.nn.Module, process_group: Any = None, *, comm: Any = None) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm*d`` / ``SyncBatchNorm`` in ``module`` by
    :class:`SyncBatchNorm`, sharing its parameters and buffers (as torch's own convert does).

    Args:
        module: the model (or a single batch-norm module).
        comm: communicator for the new layers (see :class:`SyncBatchNorm`).
        process_group: a torch.distributed group to sync over instead.

    Returns:
        The converted module (a new object when ``module`` itself is a batch norm).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = convert_sync_batchnorm(model)
    """
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, comm=comm)
        if module.affine:
            with torch.no_grad():
                new.weight = module.weight
                new.bias = module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, process_group, comm=comm)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
