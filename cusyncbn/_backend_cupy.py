"""The GPU backend: the steps of ``_backend.py`` as CUDA kernels (``_kernels/syncbn.cu``).

Every launch goes on the current CuPy stream and nothing here reads device memory
from the host, so a training forward/backward never synchronizes with the host and
can be captured in a CUDA graph. One kernel per step (``_kernels/syncbn.cu``): two
launches per training forward or backward, one per eval forward. Kernels are compiled once
per (device, input dtype, loads in flight) by ``cupy.RawModule`` and fetched by name; the
launch of each step (kernel, grid, block, workspaces) is planned once per shape, dtype,
alignment class and stream (``_plan``), from ``_tuning``.
"""
from __future__ import annotations

import ctypes
import threading
from functools import partial
from operator import attrgetter
from typing import Any

import numpy as np

from . import _flags, _kernels, _tuning
from ._backend import Backend, Stats, dtype_name as _name_of
from ._dlpack import device_of
from ._launch import Arguments, backward_arguments, dx_arguments, moments_arguments, normalize_arguments
from ._tuning import LaunchConfig


class _Plan:
    """Everything about one launch that does not change between calls: the kernel, grid,
    block, shared memory, the shape arguments and the workspaces (see ``CupyBackend._plan``),
    and the packed arguments (:class:`~cusyncbn._launch.Arguments`) with those filled in."""

    __slots__ = ("kernel", "grid", "block", "shared", "work", "vec", "kind", "fixed", "args")

    def __init__(self, kernel: Any, grid: tuple, block: tuple, shared: int, work: tuple, vec: int, kind: str,
                 fixed: dict) -> None:
        self.kernel, self.grid, self.block, self.shared = kernel, grid, block, shared
        self.work, self.vec, self.kind = work, vec, kind
        self.fixed = fixed                 # parameter name -> value for what the plan fixes (A, C, B, workspaces)
        self.args = self.arguments()       # the pack the full path rewrites on each launch

    def arguments(self) -> Arguments:
        """A new argument pack of this launch with the shape and workspaces filled in."""
        args = Arguments(_kernels.PARAMS[self.kind])
        args.update(self.fixed)
        return args


_WORK = {"moments": ("part", "ticket", "pivot"), "normalize": ("pivot",), "backward": ("part", "ticket"), "dx": ()}
# Kernel scalar kinds -> the NumPy scalar type RawKernel.__call__ must get (it passes each by size).
_SCALARS = {"i": np.int32, "d": np.float64, "Q": np.uint64}


class CupyBackend(Backend):
    plans = True
    max_grid_y = _tuning.MAX_GRID_Y     # CUDA's limit; channel-second kernels loop over more channels
    # 32-bit row / position indices, with room for one grid stride past the end.
    max_extent = (1 << 31) - (1 << 25)

    def __init__(self, index: int) -> None:
        import cupy
        super().__init__()
        self.xp = cupy
        self.device = f"gpu:{index}"
        self._index = self.index = index
        self._cuda_device = cupy.cuda.Device(index)
        # What a planned call asks per call, as C functions (no Python frame): the current
        # device, the current stream of this device, an array's address.
        self.current_device = cupy.cuda.runtime.getDevice
        self.current_stream = partial(cupy.cuda.get_current_stream, index)
        self.pointer = attrgetter("data.ptr")
        self.array_types = (cupy.ndarray,)
        # The layout a signature keys on includes the array's device: an array of another GPU
        # must take the full path (which refuses it), not launch here with its pointer.
        self.accept_array_type(cupy.ndarray, self.pointer, attrgetter("strides", "data.device_id"))
        self.allocate, self.allocate_zeros = cupy.empty, cupy.zeros
        with self._cuda_device:
            self._sms = self._cuda_device.attributes["MultiProcessorCount"]
            self.arch = _tuning.arch_key(self._cuda_device.compute_capability, self._sms)
        self._init_plans()
        self._ring = self._make_ring()

    def _init_plans(self) -> None:
        self._modules: dict[tuple[str, int], Any] = {}
        self._kernels: dict[tuple[str, str, int], Any] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._pivots: dict[tuple, Any] = {}
        self._overrides: dict[tuple[str, str], LaunchConfig] = {}
        self.table: dict | None = None            # None: the shipped table (_tuning.load_table)

    def set_launch_config(self, kind: str, layout: str, config: LaunchConfig | None) -> None:
        """Launch pass ``kind`` (moments, normalize, backward, dx) in ``layout`` ("cs" channel-
        second, "cl" channel-last) with ``config`` from now on (None: back to the table or the
        heuristic)."""
        if kind not in _kernels.PASSES or layout not in _kernels.LAYOUTS:
            raise ValueError(f"unknown pass {kind!r} / layout {layout!r}: expected one of "
                             f"{_kernels.PASSES} and {_kernels.LAYOUTS}")
        if config is not None:
            _tuning.check_config(config)
        if config is None:
            self._overrides.pop((kind, layout), None)
        else:
            self._overrides[(kind, layout)] = config
        self._plans.clear()

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

    def scope(self) -> Any:
        return self._cuda_device

    def give_back(self, stats: Stats) -> None:
        # Statistics used inside a CUDA graph capture belong to the graph (its replays write
        # them): never hand them to eager calls.
        if not self.capturing():
            super().give_back(stats)

    def capturing(self) -> bool:
        """Whether the current stream of this device is being captured into a CUDA graph."""
        return self.xp.cuda.get_current_stream(self._index).is_capturing()

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
    def _kernel(self, dtype_name: str, key: str, loads: int) -> Any:
        kernel = self._kernels.get((dtype_name, key, loads))
        if kernel is None:
            names = _kernels.name_expressions(dtype_name)
            module = self._modules.get((dtype_name, loads))
            if module is None:
                with self._cuda_device:
                    module = self.xp.RawModule(code=_kernels.source(), options=_kernels.options(loads),
                                               name_expressions=list(names.values()))
                self._modules[(dtype_name, loads)] = module
            kernel = self._kernels[(dtype_name, key, loads)] = module.get_function(names[key])
        return kernel

    @staticmethod
    def _resources(kernel: Any) -> tuple[int, int]:
        """(registers per thread, static shared bytes) of a compiled kernel."""
        attributes = kernel.attributes
        return attributes["num_regs"], attributes["shared_size_bytes"]

    def stream_key(self) -> int:
        return self.xp.cuda.get_current_stream(self._index).ptr

    @staticmethod
    def _address(a: Any) -> int:
        return a.data.ptr

    def address_of(self, a: Any) -> int:
        return self._address(a)

    def launch_plan(self, kind: str, x3: Any, arrays: tuple, pname: str) -> _Plan:
        """The launch plan of pass ``kind`` over ``x3`` (see ``_plan``), under this device."""
        with self._cuda_device:
            return self._plan(kind, x3, arrays, pname)

    def launch_config(self, kind: str, layout: str, dtype_name: str, shape3: tuple[int, int, int]) -> LaunchConfig:
        """The configuration a pass runs with: override, else measured table, else heuristic."""
        config = self._overrides.get((kind, layout))
        if config is None:
            config = _tuning.lookup(self.arch, kind, layout, dtype_name, shape3, self.table) or _tuning.DEFAULT
        return config

    def _plan(self, kind: str, x3: Any, arrays: tuple, pname: str) -> _Plan:
        """The cached launch plan of pass ``kind`` over ``x3``. Per call only the alignment of
        ``arrays`` (None: an array not passed) is checked (the OR of their addresses modulo 16: a
        plan per alignment class, narrower vectors for misaligned data)."""
        misalign = 0
        for arr in arrays:
            if arr is not None:
                misalign |= self._address(arr)
        key = (kind, x3.shape, x3.dtype, pname, misalign & 15, self.stream_key(), threading.get_ident())
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(kind, x3.shape, _name_of(x3.dtype), pname, misalign & 15)
        return plan

    def _make_plan(self, kind: str, shape3: tuple, dtype_name: str, pname: str, misalign: int) -> _Plan:
        a, c, b = shape3
        layout = _tuning.layout_for(shape3, dtype_name, misalign)
        config = self.launch_config(kind, layout, dtype_name, shape3)
        itemsize = _kernels.ITEMSIZE[dtype_name]
        vec = _tuning.vector_width(c * b if layout == "cl" else b, dtype_name, misalign, config.vec)
        kernel = self._kernel(dtype_name, _kernels.kernel_key(kind, layout, vec, pname), config.loads)
        registers, static = self._resources(kernel)
        def fit(threads: int, shared: int) -> int:
            return _tuning.resident_blocks(registers, threads, shared + static)
        launch = _tuning.launch_grid(kind, layout, shape3, vec, itemsize, config, fit, self._sms)
        grid, block = launch.grid, launch.block
        if layout == "cs":
            grid = (grid[0], min(grid[1], self.max_grid_y))
        work: tuple = ()
        if kind in _kernels.REDUCTIONS:
            if layout == "cl":      # split partials, then channel_totals' edge shares; tile tickets, then channels'
                tiles, splits = grid
                partials = (c * b * splits * 2 if splits > 1 else 0) + (tiles * 4 if b > 1 else 0)
                tickets = tiles + (c if b > 1 else 0)
            else:
                partials, tickets = (c * grid[0] * 2 if grid[0] > 1 else 0), c
            work = (self.scratch("partials", max(partials, 1), np.float64),
                    self.scratch("tickets", tickets, np.uint32, zeroed=True))
        if kind in ("moments", "normalize"):
            work += (self._pivot(c),)
        fixed = {"A": a, "C": c, "B": b, **{name: self._address(buf) for name, buf in zip(_WORK[kind], work)}}
        return _Plan(kernel, tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block)),
                     launch.shared, work, vec, kind, fixed)

    def _pivot(self, channels: int) -> Any:
        """The pivot K the moments kernel hands to the normalize kernel (one array per channel
        count, stream and thread, so that both kernels of a forward see the same one)."""
        key = (channels, self.stream_key(), threading.get_ident())
        pivot = self._pivots.get(key)
        if pivot is None:
            pivot = self._pivots[key] = self.empty((channels,), np.float64)
        return pivot

    @staticmethod
    def _param_name(*arrays: Any) -> str:
        """Dtype name of the layer's parameter-like arrays (all share it); float32 when none is given."""
        for arr in arrays:
            if arr is not None:
                return _name_of(arr.dtype)
        return "float32"

    # -- launching ------------------------------------------------------------------------------
    #: "packed" (the default): each launch goes to the driver (``cuLaunchKernel``) with the
    #: plan's pre-packed arguments, rewritten in place; "call": ``RawKernel.__call__`` with a
    #: tuple of CuPy arrays and NumPy scalars (CuPy's documented path, kept as the fallback).
    launch_mode = "packed"

    def _run(self, plan: _Plan, values: dict) -> None:
        """Launch ``plan`` with the per-call ``values`` (its kernel's builder in ``_launch``:
        parameter name -> array, address, None or number) on the current stream."""
        if self.launch_mode == "call":
            merged = {**plan.fixed, **values}
            args = tuple(self._call_argument(merged[name], kind, plan.work, name)
                         for name, kind in _kernels.PARAMS[plan.kind])
            plan.kernel(plan.grid, plan.block, args, shared_mem=plan.shared)
            return
        args = plan.args
        args.update(plan.fixed)
        for name, value in values.items():
            args.set(name, self._address(value) if hasattr(value, "dtype") and value.ndim else value)
        self.packed_launcher(plan, args, self.stream_key())()

    def _call_argument(self, value: Any, kind: str, work: tuple, name: str) -> Any:
        if kind in _SCALARS:
            return _SCALARS[kind](value)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            # A plan-fixed address (workspace) or a raw slot address: the array it came from.
            for buf in work:
                if self._address(buf) == value:
                    return buf
            return self._raw_pointer(value)
        return value

    @staticmethod
    def _raw_pointer(address: int) -> Any:
        # A pointer parameter is 8 bytes: the address passed as an unsigned long long.
        # (cupy.cuda.function.CPointer(p) would pass the 8 bytes *at* p.)
        return np.uint64(address)

    def set_launch_mode(self, mode: str) -> None:
        """"packed" (default): launches through the driver with pre-packed arguments, and
        repeated calls planned per signature; "call": every launch through
        ``RawKernel.__call__`` and every call on the full path (CuPy's documented path, kept
        as a fallback and for comparisons).

        Raises:
            ValueError: another mode.
        """
        if mode not in ("packed", "call"):
            raise ValueError(f"launch mode must be 'packed' or 'call', got {mode!r}")
        self.launch_mode = mode
        self.plans = mode == "packed"

    def packed_launcher(self, plan: _Plan, args: Arguments, stream: int) -> Any:
        """A callable of no arguments that launches ``plan`` with ``args`` on ``stream`` (the
        driver copies the arguments when it queues the launch)."""
        driver = self.xp.cuda.driver
        grid, block = plan.grid, plan.block
        launch = partial(driver.launchKernel, self._function_pointer(plan.kernel), grid[0], grid[1], grid[2],
                         block[0], block[1], block[2], plan.shared, stream, args.address, 0)
        launch.packed = args                   # the cells its address points at live as long as it does
        return launch

    def _function_pointer(self, kernel: Any) -> int:
        with self._cuda_device:
            return kernel.kernel.ptr

    def report_ring(self) -> Any:
        """This device's ring of report slots (see ``_flags``), made with the backend (so that a
        first call inside a CUDA graph capture allocates nothing)."""
        return self._ring

    def _make_ring(self, size: int = 1024) -> Any:
        """Report slots in pinned host memory mapped into the device's address space
        (``cudaHostAlloc`` with ``cudaHostAllocPortable | cudaHostAllocMapped``; the kernels get
        the device address ``cudaPointerGetAttributes`` gives, the host address under unified
        addressing), zeroed."""
        runtime = self.xp.cuda.runtime
        with self._cuda_device:
            try:
                flags = getattr(runtime, "hostAllocPortable", 1) | getattr(runtime, "hostAllocMapped", 2)
                host_address = runtime.hostAlloc(8 * size, flags)
                device_address = runtime.pointerGetAttributes(host_address).devicePointer
                host = np.ctypeslib.as_array((ctypes.c_uint64 * size).from_address(host_address))
            except AttributeError:                     # a CuPy without these bindings
                from cupyx import empty_pinned
                host = empty_pinned((size,), np.uint64)
                device_address = host.ctypes.data
        host[...] = 0
        # Kept for the life of the process (8 bytes per slot per device), as the backend is.
        return _flags.ReportRing(host, device_address, self._cuda_device.synchronize)

    # -- the steps of _backend.Backend: one kernel each ---------------------------------------
    def local_moments(self, *, x3: Any, pivot_state: Any, tag: int, buf: Any, pivot_payload: Any = None) -> None:
        with self._cuda_device:
            plan = self._plan("moments", x3, (x3,), "float32")      # (the parameter type plays no part)
            self._run(plan, moments_arguments(x=x3, pivot_state=pivot_state, pivot_payload=pivot_payload, tag=tag,
                                              buf=buf))

    def normalize_batch(self, *, x3: Any, buf: Any, tag: int, ranks: int, running_mean: Any, running_var: Any,
                        momentum: float, eps: float, unbiased: bool, weight: Any, bias: Any, stats: Stats,
                        y3: Any, report: int = 0, seq: int = 0, pivot_state_out: Any = None,
                        strict: bool = False, residual3: Any = None, relu: bool = False) -> None:
        with self._cuda_device:
            plan = self._plan("normalize", x3, (x3, y3, residual3),
                              self._param_name(running_mean, running_var, weight, bias))
            self._run(plan, normalize_arguments(
                x=x3, y=y3, stats=stats.data, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias, eps=eps, residual=residual3, relu=relu, buf=buf, tag=tag, ranks=ranks, momentum=momentum,
                unbiased=unbiased, report=report, seq=seq, pivot_state_out=pivot_state_out, strict=strict))

    def normalize_fixed(self, *, x3: Any, running_mean: Any, running_var: Any, eps: float, weight: Any, bias: Any,
                        stats: Stats, y3: Any, residual3: Any = None, relu: bool = False) -> None:
        with self._cuda_device:
            plan = self._plan("normalize", x3, (x3, y3, residual3),
                              self._param_name(running_mean, running_var, weight, bias))
            self._run(plan, normalize_arguments(x=x3, y=y3, stats=stats.data, running_mean=running_mean,
                                                running_var=running_var, weight=weight, bias=bias, eps=eps,
                                                residual=residual3, relu=relu))

    def backward_reduce(self, *, dy3: Any, x3: Any, stats: Stats, weight_grad: Any, bias_grad: Any,
                        tag: int, buf: Any, y3: Any = None) -> None:
        with self._cuda_device:
            plan = self._plan("backward", x3, (dy3, x3, y3), self._param_name(weight_grad, bias_grad))
            self._run(plan, backward_arguments(dy=dy3, x=x3, stats=stats.data, tag=tag, weight_grad=weight_grad,
                                               bias_grad=bias_grad, buf=buf, y=y3))

    def backward_input(self, *, dy3: Any, x3: Any, stats: Stats, buf: Any, count: Any, tag: int, ranks: int,
                       dx3: Any, y3: Any = None, dresidual3: Any = None, report: int = 0, seq: int = 0) -> None:
        fixed = count is None                           # eval statistics: no batch terms, x unread
        with self._cuda_device:
            plan = self._plan("dx", x3, (dy3, x3, dx3, y3, dresidual3), "")
            self._run(plan, dx_arguments(dy=dy3, x=x3, dx=dx3, stats=stats.data, ranks=ranks, y=y3,
                                         dresidual=dresidual3, buf=None if fixed else buf, count=count, tag=tag,
                                         report=report, seq=seq))
