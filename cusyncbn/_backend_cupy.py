"""The GPU backend: the steps of ``_backend.py`` as CUDA kernels (``_kernels/syncbn.cu``).

Every launch goes on the current CuPy stream and nothing here reads device memory
from the host, so a training forward/backward never synchronizes with the host and
can be captured in a CUDA graph. Kernels are compiled once per (device, input dtype)
by ``cupy.RawModule`` and fetched by name.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _kernels
from ._backend import Backend, Stats, dtype_name as _name_of
from ._dlpack import device_of
from ._launch import cupy_launcher

_THREADS = 256            # 1-D blocks: reductions and elementwise passes
_CL_THREADS = 512         # channel-last reductions: lanes along channels x rows (CL_THREADS in syncbn.cu)
_CL_TAIL = 32             # at most this many partials per thread and channel in the last block's merge
_CHANNEL_THREADS = 128    # one thread per channel kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class CupyBackend(Backend):
    _max_grid_y = 65535           # CUDA's limit; channel-second reductions loop over more channels

    def __init__(self, index: int) -> None:
        import cupy
        super().__init__()
        self.xp = cupy
        self.device = f"gpu:{index}"
        self._index = index
        self._cuda_device = cupy.cuda.Device(index)
        with self._cuda_device:
            self._sms = self._cuda_device.attributes["MultiProcessorCount"]
        self._modules: dict[str, Any] = {}
        self._kernels: dict[tuple[str, str], Any] = {}
        self._packed = os.environ.get("CUSYNCBN_PACKED_LAUNCH", "0") == "1"

    def use_packed_launch(self, packed: bool) -> None:
        """Launch through ``_launch.PackedLaunch`` (True) or ``cupy.RawKernel`` (False)."""
        self._packed = bool(packed)
        self._kernels.clear()

    # -- arrays ---------------------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        return isinstance(x, self.xp.ndarray)

    def import_array(self, x: Any, what: str) -> Any:
        cupy = self.xp
        if isinstance(x, cupy.ndarray):
            if x.device.id != self._index:
                raise ValueError(f"{what} is on gpu:{x.device.id} but this layer is on {self.device}")
            return x
        if isinstance(x, np.ndarray) or not hasattr(x, "__dlpack_device__"):
            raise ValueError(f"{what} is a host array ({type(x).__name__}) but this layer is on {self.device}; "
                             "copy it to the GPU first (cupy.asarray), or use a CPU layer")
        where = device_of(x)
        if where != self.device:
            raise ValueError(f"{what} lives on {where} but this layer is on {self.device}")
        if getattr(x, "requires_grad", False):
            x = x.detach()
        with self._cuda_device:
            # cupy.from_dlpack passes the current stream to the producer, which orders its
            # pending work (e.g. torch's current stream) before ours.
            try:
                return cupy.from_dlpack(x)
            except (TypeError, NotImplementedError, BufferError, ValueError) as exc:
                if "bfloat16" in str(getattr(x, "dtype", "")):
                    raise TypeError(f"{what}: bfloat16 on the GPU needs CuPy >= 14 with ml_dtypes installed "
                                    f"(pip install 'cusyncbn[cuda12]' brings both); CuPy said: {exc}") from exc
                raise TypeError(f"{what}: cannot import a {type(x).__name__} through DLPack: {exc}") from exc

    def zeros(self, shape: Any, dtype: Any) -> Any:
        with self._cuda_device:
            return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape: Any, dtype: Any) -> Any:
        with self._cuda_device:
            return self.xp.empty(shape, dtype=dtype)

    def contiguous(self, x: Any) -> Any:
        with self._cuda_device:
            return self.xp.ascontiguousarray(x)

    # -- kernels ----------------------------------------------------------------------------
    def _kernel(self, dtype_name: str, key: str) -> Any:
        kernel = self._kernels.get((dtype_name, key))
        if kernel is None:
            names = _kernels.name_expressions(dtype_name)
            module = self._modules.get(dtype_name)
            if module is None:
                with self._cuda_device:
                    module = self.xp.RawModule(code=_kernels.source(), options=_kernels.OPTIONS,
                                               name_expressions=list(names.values()))
                self._modules[dtype_name] = module
            kernel = module.get_function(names[key])
            if self._packed:
                with self._cuda_device:
                    kernel = cupy_launcher(kernel, self._index)
            self._kernels[(dtype_name, key)] = kernel
        return kernel

    def stream_key(self) -> int:
        return self.xp.cuda.get_current_stream(self._index).ptr

    @staticmethod
    def _address(a: Any) -> int:
        return a.data.ptr

    def _widest(self, dtype_name: str, extent: int, arrays: tuple) -> int:
        """The widest vector (in elements) dividing ``extent`` with every array aligned to it."""
        itemsize = _kernels.ITEMSIZE[dtype_name]
        addresses = [self._address(a) for a in arrays if a is not None]
        for v in _kernels.vector_widths(dtype_name):
            if extent % v == 0 and all(p % (v * itemsize) == 0 for p in addresses):
                return v
        return 1

    def _splits_cs(self, channels: int, per_channel: int, vec: int) -> int:
        want = _cdiv(4 * self._sms, channels)
        useful = _cdiv(per_channel, _THREADS * vec * 4)
        return int(max(1, min(want, useful, 65535)))

    def _cl_config(self, rows: int, channels: int, vec: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Grid (channel tiles, splits) and block (lanes, rows) of a channel-last reduction."""
        lanes = 1
        while lanes < 32 and lanes * vec < channels:      # no idle lanes for small C
            lanes *= 2
        rows_per_block = _CL_THREADS // lanes
        gx = _cdiv(channels, lanes * vec)
        want = _cdiv(2 * self._sms, gx)                    # two 512-thread blocks per SM
        useful = _cdiv(rows, rows_per_block * 4)           # at least ~4 rows per thread
        tail = _cdiv(_CL_TAIL * rows_per_block, vec)       # bounds the last block's merge
        return (gx, int(max(1, min(want, useful, tail, 65535)))), (lanes, rows_per_block)

    def _elementwise_grid(self, total: int, vec: int) -> int:
        return int(max(1, min(_cdiv(total, _THREADS * vec), 16 * self._sms)))

    def _reduce(self, kind: str, x3: Any, inputs: tuple, width: int, pname: str, before: tuple,
                grads: tuple, buf: Any) -> None:
        """One-pass reduction (``moments`` or ``backward``) of ``inputs`` into the payload ``buf``:
        per-split partials, merged by the last block of each channel (tile).

        Its vectors stay inside a channel (channel-second) or on consecutive channels of one
        row (channel-last). Arguments: inputs, shape, ``before``, workspace, ``grads``, ``buf``.
        """
        a, c, b = x3.shape
        if a * b == 0:
            buf.fill(0)
            return
        name = _name_of(x3.dtype)
        vec = self._widest(name, c if b == 1 else b, inputs)
        if b == 1:
            grid, block = self._cl_config(a, c, vec)
            splits, tickets = grid[1], grid[0]
            shape = (np.int64(a), np.int32(c))
            shared = width * _CL_THREADS * 8
        else:
            splits = self._splits_cs(c, a * b, vec)
            grid, block, tickets = (splits, min(c, self._max_grid_y)), (_THREADS,), c
            shape = (np.int64(a), np.int32(c), np.int64(b))
            shared = 0
        part = self.scratch("partials", c * splits * width if splits > 1 else 1, np.float64)
        ticket = self.scratch("tickets", tickets, np.uint32, zeroed=True)
        self._kernel(name, f"{kind}_{'cl' if b == 1 else 'cs'}{vec}_{pname}")(
            grid, block, inputs + shape + before + (part, ticket) + grads + (buf,), shared_mem=shared)

    def _elementwise(self, kind: str, x3: Any, arrays: tuple, stats_args: tuple) -> None:
        """An elementwise pass (``normalize`` or ``dx``) over ``arrays``; its vectors may straddle
        channels. Arguments: arrays, total, C, B, ``stats_args``."""
        a, c, b = x3.shape
        total = a * c * b
        if total == 0:
            return
        name = _name_of(x3.dtype)
        vec = self._widest(name, total, arrays)
        self._kernel(name, f"{kind}_{'true' if b == 1 else 'false'}{vec}")(
            (self._elementwise_grid(total, vec),), (_THREADS,),
            arrays + (np.int64(total), np.int32(c), np.int64(b)) + stats_args)

    @staticmethod
    def _param_name(*arrays: Any) -> str:
        """Dtype name of the layer's parameter-like arrays (all share it); float32 when none is given."""
        for arr in arrays:
            if arr is not None:
                return _name_of(arr.dtype)
        return "float32"

    def _channel_grid(self, channels: int) -> tuple[tuple[int], tuple[int]]:
        return (_cdiv(channels, _CHANNEL_THREADS),), (_CHANNEL_THREADS,)

    # -- the steps of _backend.Backend --------------------------------------------------------
    def local_moments(self, x3: Any, running_mean: Any, tag: int, buf: Any) -> None:
        with self._cuda_device:
            c = x3.shape[1]
            self._reduce("moments", x3, (x3,), 3, self._param_name(running_mean), (running_mean,), (), buf[:2 * c + 1])
            buf[2 * c + 1].fill(tag)
            buf[2 * c + 2].fill(float(tag) * tag)

    def normalize_batch(self, x3: Any, buf: Any, tag: int, ranks: int, running_mean: Any, running_var: Any,
                        momentum: float, eps: float, unbiased: bool, weight: Any, bias: Any, stats: Stats,
                        y3: Any) -> None:
        with self._cuda_device:
            c = stats.mean.shape[0]
            grid, block = self._channel_grid(c)
            pname = self._param_name(running_mean, running_var, weight, bias)
            self._kernel(_name_of(x3.dtype), f"finalize_{pname}")(
                grid, block, (buf, np.int32(c), running_mean, running_var, np.float64(momentum), np.float64(eps),
                              np.int32(bool(unbiased)), weight, bias, stats.data))
            stats.flags.fill(0)
            self._elementwise("normalize", x3, (x3, y3), (stats.data,))

    def normalize_fixed(self, x3: Any, running_mean: Any, running_var: Any, eps: float, weight: Any, bias: Any,
                        stats: Stats, y3: Any) -> None:
        with self._cuda_device:
            c = stats.mean.shape[0]
            grid, block = self._channel_grid(c)
            self._kernel(_name_of(x3.dtype), f"eval_{_name_of(running_mean.dtype)}")(
                grid, block, (running_mean, running_var, np.int32(c), np.float64(eps), weight, bias, stats.data))
            stats.flags.fill(0)
            self._elementwise("normalize", x3, (x3, y3), (stats.data,))

    def backward_reduce(self, dy3: Any, x3: Any, stats: Stats, weight_grad: Any, bias_grad: Any,
                        tag: int, buf: Any) -> None:
        with self._cuda_device:
            c = x3.shape[1]
            self._reduce("backward", x3, (dy3, x3), 2, self._param_name(weight_grad, bias_grad),
                         (stats.data,), (weight_grad, bias_grad), buf[:2 * c])
            buf[2 * c].fill(tag)
            buf[2 * c + 1].fill(float(tag) * tag)

    def backward_input(self, dy3: Any, x3: Any, stats: Stats, buf: Any, count: Any, tag: int, ranks: int,
                       dx3: Any) -> None:
        fixed = count is None                           # eval statistics: no batch terms
        with self._cuda_device:
            self._elementwise("dx", x3, (dy3, x3, dx3),
                              (stats.data, None if fixed else buf, None if fixed else count))
