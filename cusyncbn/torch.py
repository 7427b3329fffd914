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
from typing import Any

import torch

from ._comm import resolve_comm
from ._layer import SyncBatchNorm as _CoreSyncBatchNorm

__all__ = ["SyncBatchNorm", "TorchDistComm", "convert_sync_batchnorm"]


class TorchDistComm:
    """A cusyncbn communicator over a ``torch.distributed`` process group.

    Args:
        group: the process group (default: the world group).
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("TorchDistComm needs torch.distributed.init_process_group() first")
        self._dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def allreduce(self, buf: Any) -> None:
        tensor = torch.from_dlpack(buf)
        self._dist.all_reduce(tensor, group=self.group)

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


def _view(t: torch.Tensor | None, device: str) -> Any:
    """A NumPy/CuPy array sharing ``t``'s memory."""
    if t is None:
        return None
    t = t.detach()
    if device == "cpu":
        return t.numpy()
    import cupy
    return cupy.from_dlpack(t)


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, bias: Any, module: "SyncBatchNorm",
                momentum: float, channel_last: bool) -> torch.Tensor:
        with _on_torch_stream(x):
            engine = module._engine_for(x)
            y, saved = engine._forward(x.detach(), momentum=momentum, channel_last=channel_last)
            y = torch.from_dlpack(y)
        ctx.module, ctx.engine, ctx.saved = module, engine, saved
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        module, engine, saved = ctx.module, ctx.engine, ctx.saved
        need_w = ctx.needs_input_grad[1]
        need_b = ctx.needs_input_grad[2]
        with _on_torch_stream(dy):
            module._bind(engine, grads=(need_w, need_b))
            # dy has the shape of the forward's (possibly channel-last permuted) input; the
            # permutes around this function are differentiated by autograd itself.
            dx = torch.from_dlpack(engine._backward(saved, dy.detach().contiguous()))
            dw = torch.from_dlpack(engine.weight.grad) if need_w else None
            db = torch.from_dlpack(engine.bias.grad) if need_b else None
        return dx, dw, db, None, None, None


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
        self._engines: dict[str, Any] = {}

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, backend=cusyncbn")

    def _comm(self, device: str) -> Any:
        from ._comm import SingleProcessComm
        if not self.sync:
            return SingleProcessComm()
        if self.process_group is not None:
            return TorchDistComm(self.process_group)
        return resolve_comm(self._comm_arg, device)

    def _engine_for(self, x: torch.Tensor) -> Any:
        device = _device_name(x)
        engine = self._engines.get(device)
        if engine is None:
            param_dtype = "float64" if (self.weight is not None and self.weight.dtype == torch.float64) or \
                (self.running_mean is not None and self.running_mean.dtype == torch.float64) else "float32"
            engine = _CoreSyncBatchNorm(self.num_features, epsilon=self.eps, comm=self._comm(device),
                                        device=device, dtype=param_dtype, unbiased_running_var=True,
                                        weight_attr=None if self.affine else False,
                                        bias_attr=None if self.affine else False)
            engine._track_running_stats = self.track_running_stats
            self._engines[device] = engine
        engine._epsilon = float(self.eps)
        engine.training = self.training
        self._bind(engine, grads=(False, False))
        return engine

    def _bind(self, engine: Any, grads: tuple[bool, bool]) -> None:
        """Point the engine's arrays at this module's tensors (zero-copy) and give it fresh grads."""
        device = engine.device
        if self.affine:
            engine.weight.data = _view(self.weight, device)
            engine.bias.data = _view(self.bias, device)
            engine.weight.trainable, engine.bias.trainable = grads
            engine.weight.grad = engine._backend.zeros(engine.weight.data.shape, engine.weight.data.dtype) \
                if grads[0] else None
            engine.bias.grad = engine._backend.zeros(engine.bias.data.shape, engine.bias.data.dtype) \
                if grads[1] else None
        if self.track_running_stats:
            engine._mean = _view(self.running_mean, device)
            engine._variance = _view(self.running_var, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2D to 5D input (got {x.dim()}D input)")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:                    # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        channel_last = _is_channels_last(x)
        xin = _to_channel_last(x) if channel_last else x.contiguous()
        y = _Function.apply(xin, self.weight, self.bias, self, 1.0 - momentum, channel_last)
        return _from_channel_last(y) if channel_last else y


def convert_sync_batchnorm(module: torch.nn.Module, comm: Any = None, process_group: Any = None) -> torch.nn.Module:
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
        new_child = convert_sync_batchnorm(child, comm, process_group)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
