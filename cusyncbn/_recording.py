"""A recording stand-in for CuPy: the real GPU code path on a CPU, with its host work counted.

cusyncbn's GPU code (``_backend_cupy.CupyBackend``, ``_nccl.NCCLComm``, the report flags)
runs only with CuPy on a GPU, so what a pass costs on the host there (launches, device
switches, stream lookups, allocations, copies...) cannot be seen in CI. Within
:func:`installed`, ``import cupy`` (and ``cupy.cuda``, ``cupy.cuda.runtime``,
``cupy.cuda.driver``, ``cupy.cuda.nccl``, ``cupy.cuda.function``, ``cupyx``) gives this
module's fake instead: arrays live in NumPy memory (256-byte aligned, as CuPy's pool hands
them out; fresh memory reads as all-ones bits, NaN in every float type), and every call that
CuPy 14 turns into CUDA work adds to a :class:`Ledger`, so a test can run one pass of the
real code and assert what it cost.

The semantics follow CuPy 14.2's own sources (tag v14.2.0 of github.com/cupy/cupy), down to
the CUDA calls CuPy makes on the caller's behalf:

- ``with Device(i)`` (``cupy/cuda/device.pyx``): ``__enter__`` reads the current device
  and calls ``setDevice`` only when it differs; ``__exit__`` calls ``setDevice`` with the
  saved device *always*. So entering the current device costs one switch, another device
  two. ``Device.synchronize`` and the first ``compute_capability`` of a device save and
  restore the device (two switches).
- ``ndarray.device`` builds a new ``Device`` (``MemoryPointer.device``, ``cupy/cuda/memory.pyx``);
  ``get`` and ``set`` (``cupy/_core/core.pyx``) do ``setDevice(self.device.id)`` ...
  ``setDevice(prev)`` around the copy: one copy, one device object, two switches, plus a
  stream synchronize when ``get`` blocks.
- ``cupy.from_dlpack`` (``cupy/_core/dlpack.pyx``) switches to the producer's device and back
  and hands the producer the current stream (the legacy stream 1 for the null stream); it
  refuses host producers. ``ndarray.__dlpack__`` exports only the host copy CuPy makes for
  ``dl_device=(1, 0)`` (a copy and a sync): a CUDA export has no consumer without a GPU.
- ``RawKernel.__call__`` (``cupy/cuda/function.pyx``) takes tuples for grid and block and
  refuses host arrays of more than one element; ``CPointer(p)`` is a pointer *to* the
  argument's bytes (as CuPy passes it to ``cuLaunchKernel``), not a pointer value.
- ``nccl.get_unique_id`` returns 128 bytes and ``NcclCommunicator`` insists on them.

Counted, in :class:`Ledger` (:data:`COUNTERS`):

- ``launches``: ``RawKernel.__call__`` and ``driver.launchKernel``; ``launch_args``: the
  arguments passed through ``RawKernel.__call__`` (CuPy wraps each one per call), 0 for
  ``launchKernel``. ``ledger.kernels`` lists ``(name, grid)`` per launch; ``ledger.on_launch``,
  when set, is called with ``(function_ptr, grid, block, shared, stream_ptr, params)`` (the
  argument tuple for ``RawKernel.__call__``, the ``kernelParams`` address for
  ``launchKernel``) and may emulate the kernel.
- ``nccl``: ``NcclCommunicator.allReduce`` calls.
- ``allocations``: new device buffers (``empty``/``zeros``/``ones``/``full``/``array``,
  ``*_like``, ``astype``, ``copy``, ``ascontiguousarray`` and reshapes that must copy,
  arithmetic results); ``pinned``: ``cupyx.empty_pinned``.
- ``views``: new array objects sharing memory (reshape, slicing, ``ravel``, ``view``,
  ``from_dlpack``, ``ndarray(memptr=...)``).
- ``copies``: host-device transfers: ``get``, ``set``, ``asnumpy``, ``array`` of host data,
  host values assigned into a device array, ``item()`` / ``float()`` / ``int()``.
- ``builtin_ops``: work CuPy queues by itself (elementwise kernels and memsets of ``fill``,
  ``zeros``, ``astype``, ``copy``, item assignment, arithmetic), not in ``launches``.
- ``events``: ``Event.record``, ``Event.done``, ``Event.synchronize``, ``Stream.record``,
  ``Stream.done``.
- ``device_switches``: every ``setDevice`` (``runtime.setDevice``, ``Device.use``, and those
  CuPy makes inside ``with Device``, ``get``, ``set``, ``synchronize``, ``from_dlpack``).
- ``stream_lookups``: ``cupy.cuda.get_current_stream`` calls (not CuPy's internal C lookups).
- ``capture_queries``: ``Stream.is_capturing`` / ``runtime.streamIsCapturing``.
- ``device_objects``: ``Device`` objects built, by the caller or by CuPy (``ndarray.device``).
- ``syncs``: stream, event and device synchronizations, ``runtime.deviceSynchronize``.

``ledger.capturing`` (default False) makes every stream report that it is being captured;
synchronizing a stream then raises, as CUDA does.

Not modelled: timing (nothing here measures or fakes durations; ``get_elapsed_time`` does not
exist), kernel execution (a launch runs nothing unless ``on_launch`` does it), data movement
by NCCL (``allReduce`` moves no data whatever the communicator size), asynchrony (a copy lands
at once), memory pools, peer access, and the CuPy API beyond what cusyncbn touches (anything
else raises ``AttributeError`` naming this module).

:func:`count_frames` counts the Python frames a callable runs inside a package (this file
excepted, so the stand-in's own frames never count).
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import operator
import os
import re
import sys
import threading
import types
import warnings
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["COUNTERS", "Ledger", "count_frames", "installed"]

COUNTERS = ("launches", "launch_args", "nccl", "allocations", "views", "copies", "events", "device_switches",
            "stream_lookups", "capture_queries", "device_objects", "syncs", "pinned", "builtin_ops")


class Ledger:
    """What the code under :func:`installed` asked of CuPy; counters named by :data:`COUNTERS`."""

    __slots__ = COUNTERS + ("kernels", "on_launch", "capturing")

    def __init__(self) -> None:
        self.kernels: list[tuple[str, tuple]] = []     # (name, grid) per launch
        self.on_launch: Callable[..., None] | None = None
        self.capturing = False
        self.reset()

    def reset(self) -> None:
        """Zero every counter and forget the launches listed in ``kernels``."""
        for name in COUNTERS:
            setattr(self, name, 0)
        self.kernels.clear()

    def snapshot(self) -> dict[str, int]:
        """The counters, by name."""
        return {name: getattr(self, name) for name in COUNTERS}

    def __repr__(self) -> str:
        return "Ledger(" + ", ".join(f"{k}={v}" for k, v in self.snapshot().items() if v) + ")"


# -- errors, as CuPy names them ---------------------------------------------------------------

class CUDARuntimeError(RuntimeError):
    pass


class CUDADriverError(RuntimeError):
    pass


class NcclError(RuntimeError):
    pass


# -- the state of one installation -------------------------------------------------------------

_HANDLES = itertools.count(0x7F5A00001000, 0x100)   # fake stream / event / function handles
_ALIGN = 256
_LEGACY_STREAM, _PER_THREAD_STREAM = 1, 2            # cudaStreamLegacy, cudaStreamPerThread


class _Streams:
    """One thread's current stream per device, with the ``with stream`` stacks (stream.pyx)."""

    def __init__(self, devices: int) -> None:
        self.current = [Stream.null] * devices
        self.stacks: list[list] = [[Stream.null] for _ in range(devices)]
        self.entered: list[int] = []


class _World:
    def __init__(self, ledger: Ledger, device_count: int) -> None:
        self.ledger, self.device_count = ledger, device_count
        self.tls = threading.local()
        self.functions: dict[int, Function] = {}
        self.capabilities: dict[int, str] = {}
        self.attributes: dict[int, dict] = {}

    def device(self) -> int:
        return getattr(self.tls, "device", 0)

    def set_device(self, index: int) -> None:
        index = int(index)
        if not 0 <= index < self.device_count:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {index}")
        self.ledger.device_switches += 1
        self.tls.device = index

    def device_stack(self) -> list:
        stack = getattr(self.tls, "device_stack", None)
        if stack is None:
            stack = self.tls.device_stack = []
        return stack

    def streams(self) -> _Streams:
        streams = getattr(self.tls, "streams", None)
        if streams is None:
            streams = self.tls.streams = _Streams(self.device_count)
        return streams

    def current_stream(self, device_id: int = -1) -> "_BaseStream":
        device_id = self.device() if device_id == -1 else device_id
        return self.streams().current[device_id]

    def check_current(self, array: "ndarray") -> None:
        if array._dev != self.device():
            raise ValueError(f"Array device must be same as the current device: array device = {array._dev} "
                             f"while current = {self.device()}")


_WORLD: _World | None = None


def _w() -> _World:
    world = _WORLD
    if world is None:
        raise RuntimeError("the recording CuPy stand-in (cusyncbn._recording) is used outside installed()")
    return world


# -- devices -----------------------------------------------------------------------------------

_ATTRIBUTES = {"MultiProcessorCount": 132, "MaxThreadsPerBlock": 1024, "MaxBlockDimX": 1024, "MaxBlockDimY": 1024,
               "MaxBlockDimZ": 64, "MaxGridDimX": 2 ** 31 - 1, "MaxGridDimY": 65535, "MaxGridDimZ": 65535,
               "MaxSharedMemoryPerBlock": 49152, "MaxSharedMemoryPerBlockOptin": 232448,
               "MaxSharedMemoryPerMultiprocessor": 233472, "MaxRegistersPerBlock": 65536,
               "MaxRegistersPerMultiprocessor": 65536, "MaxThreadsPerMultiProcessor": 2048,
               "MaxBlocksPerMultiprocessor": 32, "WarpSize": 32, "ComputeCapabilityMajor": 9,
               "ComputeCapabilityMinor": 0, "UnifiedAddressing": 1, "CanMapHostMemory": 1,
               "ConcurrentManagedAccess": 1}


class Device:
    """``cupy.cuda.Device``: ``with Device(i)`` as CuPy 14 (see the module docstring)."""

    __slots__ = ("id",)

    def __init__(self, device: Any = None) -> None:
        world = _w()
        world.ledger.device_objects += 1
        self.id = world.device() if device is None else int(device)

    def __int__(self) -> int:
        return self.id

    def __enter__(self) -> "Device":
        world = _w()
        current = world.device()
        world.device_stack().append(current)
        if self.id != current:
            world.set_device(self.id)
        return self

    def __exit__(self, *exc: Any) -> None:
        world = _w()
        world.set_device(world.device_stack().pop())

    def use(self) -> "Device":
        _w().set_device(self.id)
        return self

    def synchronize(self) -> None:
        world = _w()
        previous = world.device()
        try:
            world.set_device(self.id)
            world.ledger.syncs += 1
        finally:
            world.set_device(previous)

    @property
    def compute_capability(self) -> str:
        world = _w()
        if self.id not in world.capabilities:           # CuPy caches it per device, after one switch there and back
            previous = world.device()
            try:
                world.set_device(self.id)
                world.capabilities[self.id] = "90"
            finally:
                world.set_device(previous)
        return world.capabilities[self.id]

    @property
    def attributes(self) -> dict:
        attributes = _w().attributes                     # one dict per device, as CuPy memoizes it
        return attributes.setdefault(self.id, dict(_ATTRIBUTES))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


def _get_device() -> int:
    return _w().device()


def _set_device(device: int) -> None:
    _w().set_device(device)


def _device_synchronize() -> None:
    _w().ledger.syncs += 1


def _device_count() -> int:
    return _w().device_count


def _device_properties(device: int) -> dict:
    if not 0 <= int(device) < _w().device_count:
        raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {device}")
    return {"name": b"recording stand-in (H200-like)", "uuid": f"GPU-recording-{int(device)}".encode(),
            "totalGlobalMem": 141 << 30, "multiProcessorCount": 132, "major": 9, "minor": 0,
            "pciBusID": int(device)}


# -- streams and events --------------------------------------------------------------------------

class _BaseStream:
    def __init__(self, ptr: int, device_id: int) -> None:
        self.ptr, self.device_id = ptr, device_id

    def _device(self, world: _World) -> int:
        current = world.device()
        if self.device_id not in (-1, current):
            raise RuntimeError(f"The device that the stream is created on ({self.device_id}) does not match "
                               f"with the current device ({current})")
        return current

    def __enter__(self) -> "_BaseStream":
        world = _w()
        device = self._device(world)
        streams = world.streams()
        streams.stacks[device].append(self)
        streams.entered.append(device)
        streams.current[device] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        streams = _w().streams()
        device = streams.entered.pop()
        streams.stacks[device].pop()
        streams.current[device] = streams.stacks[device][-1]

    def use(self) -> "_BaseStream":
        world = _w()
        world.streams().current[self._device(world)] = self
        return self

    def is_capturing(self) -> bool:
        ledger = _w().ledger
        ledger.capture_queries += 1
        return ledger.capturing

    def synchronize(self) -> None:
        ledger = _w().ledger
        if ledger.capturing:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: synchronizing a stream under capture")
        ledger.syncs += 1

    @property
    def done(self) -> bool:
        _w().ledger.events += 1
        return True

    def record(self, event: "Event | None" = None) -> "Event":
        event = Event() if event is None else event
        event.record(self)
        return event

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.ptr

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _BaseStream) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return self.ptr

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ptr} (device {self.device_id})>"


class Stream(_BaseStream):
    null: "Stream"
    ptds: "Stream"

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False,
                 priority: int | None = None) -> None:
        if null:
            super().__init__(0, -1)
        elif ptds:
            super().__init__(_PER_THREAD_STREAM, -1)
        else:
            super().__init__(next(_HANDLES), _w().device())
        self.non_blocking = bool(non_blocking)


Stream.null = Stream(null=True)
Stream.ptds = Stream(ptds=True)


class ExternalStream(_BaseStream):
    def __init__(self, ptr: int, device_id: int = -1) -> None:
        warnings.warn("ExternalStream is deprecated. Use Stream.from_external() instead to interoperate with "
                      "external streams that implement the CUDA stream protocol.", DeprecationWarning, stacklevel=2)
        super().__init__(int(ptr), int(device_id))


def get_current_stream(device_id: int = -1) -> _BaseStream:
    world = _w()
    world.ledger.stream_lookups += 1
    return world.current_stream(device_id)


def _stream_is_capturing(ptr: int) -> bool:
    ledger = _w().ledger
    ledger.capture_queries += 1
    return ledger.capturing


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        if interprocess and not disable_timing:
            raise ValueError("Timing must be disabled for interprocess events")
        _w()
        self.ptr = next(_HANDLES)

    @property
    def done(self) -> bool:
        _w().ledger.events += 1
        return True

    def record(self, stream: _BaseStream | None = None) -> None:
        _w().ledger.events += 1

    def synchronize(self) -> None:
        ledger = _w().ledger
        ledger.events += 1
        ledger.syncs += 1


# -- arrays ------------------------------------------------------------------------------------

class MemoryPointer:
    """``cupy.cuda.MemoryPointer``: ``ptr``, ``device_id``; ``device`` builds a ``Device``."""

    __slots__ = ("ptr", "device_id", "_owner")

    def __init__(self, owner: np.ndarray, ptr: int, device_id: int) -> None:
        self._owner, self.ptr, self.device_id = owner, ptr, device_id

    @property
    def device(self) -> Device:
        return Device(self.device_id)

    def __int__(self) -> int:
        return self.ptr

    def __add__(self, offset: int) -> "MemoryPointer":
        return MemoryPointer(self._owner, self.ptr + int(offset), self.device_id)


class _Flags:
    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, c: bool, f: bool, own: bool) -> None:
        self.c_contiguous, self.f_contiguous, self.owndata = c, f, own

    def __getitem__(self, name: str) -> bool:
        return getattr(self, {"C_CONTIGUOUS": "c_contiguous", "F_CONTIGUOUS": "f_contiguous",
                              "OWNDATA": "owndata"}.get(name, name))


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _shape(shape: Any) -> tuple:
    return (operator.index(shape),) if np.ndim(shape) == 0 else tuple(operator.index(s) for s in shape)


def _fresh(shape: Any, dtype: Any) -> np.ndarray:
    """NumPy memory as CuPy's pool hands it out: 256-byte aligned, holding garbage (all ones)."""
    shape, dtype = _shape(shape), np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    raw[start:start + nbytes] = 0xFF
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _allocated(a: np.ndarray, device: int) -> "ndarray":
    _w().ledger.allocations += 1
    return _make(a, device, None)


def _make(a: np.ndarray, device: int, base: "ndarray | None") -> "ndarray":
    x = ndarray.__new__(ndarray)
    x._a, x._dev, x.base, x._mp = a, device, base, None
    return x


def _device_copy(a: np.ndarray, dtype: Any = None) -> "ndarray":
    """A new array on the current device holding ``a`` (an elementwise copy kernel)."""
    world = _w()
    out = _fresh(a.shape, a.dtype if dtype is None else dtype)
    out[...] = a
    world.ledger.builtin_ops += 1
    return _allocated(out, world.device())


def _host_operand(value: Any) -> Any:
    """An operand of CuPy arithmetic: device arrays (on the current device) and scalars."""
    if isinstance(value, ndarray):
        _w().check_current(value)
        return value._a
    if isinstance(value, np.ndarray) and value.ndim:
        raise TypeError(f"Unsupported type {type(value)}: implicit host-to-device conversion is not allowed")
    return value


def _is_basic(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all((isinstance(i, (int, np.integer, slice)) and not isinstance(i, bool)) or i is None or i is Ellipsis
               for i in items)


def _index(index: Any) -> Any:
    """An index with device arrays in it (advanced indexing) as NumPy sees it."""
    if isinstance(index, tuple):
        return tuple(i._a if isinstance(i, ndarray) else i for i in index)
    return index._a if isinstance(index, ndarray) else index


class ndarray:
    """``cupy.ndarray`` in NumPy memory (see the module docstring for what its methods count)."""

    __slots__ = ("_a", "_dev", "base", "_mp", "__weakref__")
    __array_priority__ = 100
    __module__ = "cupy"                                  # what cusyncbn._dlpack asks to tell CuPy arrays apart

    def __init__(self, shape: Any, dtype: Any = float, memptr: MemoryPointer | None = None, strides: Any = None,
                 order: str = "C") -> None:
        world = _w()
        if memptr is None:
            a = _fresh(shape, dtype)
            world.ledger.allocations += 1
            self._a, self._dev, self.base = (np.asfortranarray(a) if order == "F" else a), world.device(), None
        else:
            owner = _root(memptr._owner)
            offset = memptr.ptr - owner.ctypes.data
            self._a = np.ndarray(_shape(shape), dtype, buffer=owner, offset=offset, strides=strides, order=order)
            self._dev, self.base = memptr.device_id, None
            world.ledger.views += 1
        self._mp = None

    # -- attributes ------------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    strides = property(lambda self: self._a.strides)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)

    @property
    def data(self) -> MemoryPointer:
        mp = self._mp
        if mp is None:
            mp = self._mp = MemoryPointer(self._a, self._a.ctypes.data, self._dev)
        return mp

    @property
    def device(self) -> Device:
        return Device(self._dev)

    @property
    def flags(self) -> _Flags:
        flags = self._a.flags
        return _Flags(flags.c_contiguous, flags.f_contiguous, self.base is None)

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:                      # not CuPy's (that one copies to the host)
        return f"<recording cupy.ndarray shape={self.shape} dtype={self.dtype} device={self._dev}>"

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                        "NumPy array explicitly.")

    # -- views -----------------------------------------------------------------------------------
    def _view(self, a: np.ndarray) -> "ndarray":
        _w().ledger.views += 1
        return _make(a, self._dev, self if self.base is None else self.base)

    def _shaped(self, a: np.ndarray) -> "ndarray":
        """The result of a reshape: a view when NumPy made one, else a copy CuPy allocates."""
        if a.size == 0 or np.may_share_memory(a, self._a):
            return self._view(a)
        return _device_copy(a)

    def reshape(self, *shape: Any, order: str = "C", copy: bool | None = None) -> "ndarray":
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = shape[0]
        if copy:
            return _device_copy(self._a.reshape(shape, order=order))
        return self._shaped(self._a.reshape(shape, order=order))

    def ravel(self, order: str = "C") -> "ndarray":
        return self._shaped(self._a.ravel(order))

    def view(self, dtype: Any = None) -> "ndarray":
        return self._view(self._a.view() if dtype is None else self._a.view(dtype))

    def __getitem__(self, index: Any) -> "ndarray":
        if _is_basic(index):
            items = index if isinstance(index, tuple) else (index,)
            return self._view(self._a[items + (Ellipsis,)] if Ellipsis not in items else self._a[index])
        return _device_copy(self._a[_index(index)])

    def __iter__(self) -> Iterator["ndarray"]:
        for i in range(len(self)):
            yield self[i]

    # -- device work -------------------------------------------------------------------------------
    def __setitem__(self, index: Any, value: Any) -> None:
        world = _w()
        world.check_current(self)
        if isinstance(value, np.ndarray) and value.ndim:
            world.ledger.copies += 1                     # CuPy copies a host array over first
        else:
            value = _host_operand(value)
        self._a[_index(index)] = value
        world.ledger.builtin_ops += 1

    def fill(self, value: Any) -> None:
        world = _w()
        world.check_current(self)
        self._a.fill(value)
        world.ledger.builtin_ops += 1

    def astype(self, dtype: Any, order: str = "K", casting: Any = None, subok: Any = None,
               copy: bool = True) -> "ndarray":
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        _w().check_current(self)
        return _device_copy(self._a, dtype)

    def copy(self, order: str = "C") -> "ndarray":
        world = _w()
        if self._dev != world.device():                 # copied over from the other device
            previous = world.device()
            world.set_device(self._dev)
            world.set_device(previous)
        return _device_copy(self._a)

    def _binary(self, other: Any, op: Callable, reflected: bool = False) -> "ndarray":
        _w().check_current(self)
        a, b = self._a, _host_operand(other)
        result = op(b, a) if reflected else op(a, b)
        return _device_copy(np.asarray(result))

    def _inplace(self, other: Any, op: Callable) -> "ndarray":
        world = _w()
        world.check_current(self)
        op(self._a, _host_operand(other))
        world.ledger.builtin_ops += 1
        return self

    def __neg__(self) -> "ndarray":
        _w().check_current(self)
        return _device_copy(-self._a)

    # -- host transfers ------------------------------------------------------------------------------
    def _transfer(self, world: _World, stream: _BaseStream, blocking: bool) -> None:
        """``setDevice(self.device.id)``, the copy, ``setDevice(prev)`` (core.pyx ``get`` / ``set``)."""
        previous = world.device()
        try:
            world.set_device(Device(self._dev).id)
            world.ledger.copies += 1
            if blocking:
                stream.synchronize()
        finally:
            world.set_device(previous)

    def _host_match(self, host: Any, verb: str) -> np.ndarray:
        """``host`` when it is a NumPy array of this array's dtype and shape (CuPy's checks)."""
        if not isinstance(host, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be {verb} cupy.ndarray")
        if host.dtype != self.dtype:
            raise TypeError(f"{host.dtype} array cannot be {verb} {self.dtype} array")
        if host.shape != self.shape:
            raise ValueError(f"Shape mismatch: a host array of shape {host.shape} for {self.shape}")
        return host

    def get(self, stream: _BaseStream | None = None, order: str = "C", out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        world = _w()
        if stream is None:
            stream = world.current_stream()
        if out is not None:
            host = self._host_match(out, "obtained from")
        else:
            if self.size == 0:
                return np.ndarray(self.shape, dtype=self.dtype)
            host = np.empty(self.shape, self.dtype, order="F" if order.upper() == "F" else "C")
        self._transfer(world, stream, blocking)
        host[...] = self._a
        return host

    def set(self, arr: np.ndarray, stream: _BaseStream | None = None) -> None:
        world = _w()
        self._host_match(arr, "set to")
        if stream is None:
            stream = world.current_stream()
        self._transfer(world, stream, False)
        self._a[...] = arr

    def item(self) -> Any:
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self.get().item()

    def tolist(self) -> Any:
        return self.get().tolist()

    def __float__(self) -> float:
        return float(self.get())

    def __int__(self) -> int:
        return int(self.get())

    def __bool__(self) -> bool:
        return bool(self.get())

    # -- DLPack ------------------------------------------------------------------------------------
    def __dlpack_device__(self) -> tuple[int, int]:
        return 2, self._dev                              # kDLCUDA

    def __dlpack__(self, *, stream: int | None = None, max_version: tuple | None = None, dl_device: Any = None,
                   copy: bool | None = None) -> Any:
        """Only the host copy CuPy makes for ``dl_device=(kDLCPU, 0)``: a CUDA export has no
        consumer on a machine without a GPU (NumPy would take this host memory for it)."""
        world = _w()
        if dl_device is None or tuple(dl_device) != (1, 0):
            raise BufferError("the recording CuPy stand-in cannot export device memory through DLPack (no consumer "
                              "without a GPU takes CUDA memory): use .get(), or dl_device=(1, 0) for a host copy")
        if copy is False:
            raise ValueError("GPU memory cannot be exported to CPU without copy.")
        world.ledger.copies += 1
        world.ledger.syncs += 1
        versioned = max_version is not None and max_version[0] >= 1
        return self._a.copy().__dlpack__(max_version=max_version if versioned else None)


def _binary_methods() -> None:
    for name in ("add", "sub", "mul", "truediv"):
        op, iop = getattr(operator, name), getattr(operator, "i" + name)
        setattr(ndarray, f"__{name}__", lambda self, other, op=op: self._binary(other, op))
        setattr(ndarray, f"__r{name}__", lambda self, other, op=op: self._binary(other, op, True))
        setattr(ndarray, f"__i{name}__", lambda self, other, op=iop: self._inplace(other, op))


_binary_methods()


# -- creation ------------------------------------------------------------------------------------

def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return ndarray(shape, dtype, order=order)


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return full(shape, 0, dtype, order)


def ones(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return full(shape, 1, dtype, order)


def full(shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> ndarray:
    a = ndarray(shape, np.asarray(fill_value).dtype if dtype is None else dtype, order=order)
    a._a.fill(fill_value)
    _w().ledger.builtin_ops += 1                         # a memset or a fill kernel
    return a


def empty_like(prototype: Any, dtype: Any = None, order: str = "K", subok: Any = None,
               shape: Any = None) -> ndarray:
    return empty(prototype.shape if shape is None else shape, prototype.dtype if dtype is None else dtype)


def zeros_like(prototype: Any, dtype: Any = None, order: str = "K", subok: Any = None,
               shape: Any = None) -> ndarray:
    return zeros(prototype.shape if shape is None else shape, prototype.dtype if dtype is None else dtype)


def array(obj: Any, dtype: Any = None, copy: bool | None = True, order: str = "K", subok: bool = False,
          ndmin: int = 0, *, blocking: bool = False) -> ndarray:
    world = _w()
    if isinstance(obj, ndarray):
        if not copy and (dtype is None or np.dtype(dtype) == obj.dtype):
            return obj
        if copy is False:
            raise ValueError("Unable to avoid copy while creating an array as requested.")
        return _device_copy(obj._a, dtype)
    if hasattr(obj, "__dlpack_device__") and not isinstance(obj, np.ndarray) and obj.__dlpack_device__()[0] == 2:
        return array(from_dlpack(obj), dtype, copy, order)
    if copy is False:
        raise ValueError("Unable to avoid copy while creating an array from host data.")
    host = np.asarray(obj, dtype=dtype)
    world.ledger.copies += 1                             # host to device
    out = _fresh(host.shape, host.dtype)
    out[...] = host
    return _allocated(out, world.device())


def asarray(a: Any, dtype: Any = None, order: str | None = None, *, copy: bool | None = None,
            blocking: bool = False) -> ndarray:
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype) and not copy:
        return a
    return array(a, dtype, copy=True if copy is None else copy)


def ascontiguousarray(a: ndarray, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got "
                        f"{type(a).__name__})")
    if (dtype is None or np.dtype(dtype) == a.dtype) and a._a.flags.c_contiguous:
        return a if a.ndim else a.ravel()
    return _device_copy(np.ascontiguousarray(a._a), dtype)


def asnumpy(a: Any, stream: _BaseStream | None = None, order: str = "C", out: np.ndarray | None = None, *,
            blocking: bool = True) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    if out is not None:
        out[...] = a
        return out
    return np.asarray(a, order=order)


class _Capsule:
    """Hands a DLPack capsule (of host memory) to ``numpy.from_dlpack``."""

    def __init__(self, capsule: Any) -> None:
        self.capsule = capsule

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return 1, 0


def from_dlpack(array: Any, *, device: Any = None, copy: bool | None = None) -> ndarray:
    world = _w()
    if device is not None:
        raise NotImplementedError("from_dlpack() does not support device yet.")
    kind, index = array.__dlpack_device__()
    if int(kind) == 1:
        raise TypeError("CPU arrays cannot be directly imported to CuPy. Use `cupy.array(numpy.from_dlpack(input))` "
                        "instead.")
    if int(kind) not in (2, 13):
        raise BufferError(f"unsupported DLPack device type {kind}")
    previous = world.device()
    try:
        world.set_device(int(index))
        stream = world.current_stream().ptr or _LEGACY_STREAM
        if isinstance(array, ndarray):
            a = array._a
        else:
            try:
                capsule = array.__dlpack__(stream=stream, max_version=(1, 0), copy=copy)
            except TypeError:
                if copy is not None:
                    raise
                capsule = array.__dlpack__(stream=stream)
            a = np.from_dlpack(_Capsule(capsule))
    finally:
        world.set_device(previous)
    world.ledger.views += 1
    return _make(a, int(index), array if isinstance(array, ndarray) else None)


# -- kernels ------------------------------------------------------------------------------------

class CPointer:
    """``cupy.cuda.function.CPointer``: ``ptr`` points at the argument's bytes."""

    def __init__(self, p: int = 0) -> None:
        self.ptr = p


class Function:
    """``cupy.cuda.function.Function``: one kernel loaded on one device; ``ptr`` is a fake handle."""

    def __init__(self, kernel: "RawKernel", device: int) -> None:
        self.kernel, self.device, self.ptr = kernel, device, next(_HANDLES)


def _kernel_argument(x: Any) -> None:
    """What CuPy turns into a kernel argument (``_pointer`` in ``cupy/cuda/function.pyx``)."""
    if x is None or isinstance(x, (ndarray, MemoryPointer, CPointer, bool, int, float, complex, np.generic)):
        return
    if isinstance(x, np.ndarray):
        if x.size == 1:
            return
        raise TypeError(f"You are trying to pass a numpy.ndarray of shape {x.shape} as a kernel parameter. Only "
                        "numpy.ndarrays of size one can be passed by value. If you meant to pass a pointer to "
                        "__global__ memory, you need to pass a cupy.ndarray instead.")
    raise TypeError(f"Unsupported type {type(x)}")


def _launch(world: _World, function: Function, grid: tuple, block: tuple, shared: int, stream: int,
            params: Any, nargs: int = 0) -> None:
    """Check the launch as the driver would, then count it (``nargs`` arguments passed by value)."""
    kernel = function.kernel
    if not (grid[0] >= 1 and grid[1] >= 1 and grid[2] >= 1 and grid[0] < 2 ** 31 and grid[1] <= 65535
            and grid[2] <= 65535):
        raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: grid {grid} of {kernel.name}")
    threads = block[0] * block[1] * block[2]
    if not (1 <= threads <= kernel.max_threads_per_block and block[2] <= 64):
        raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: block {block} of {kernel.name}")
    if shared > kernel.max_dynamic_shared_size_bytes:
        raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {shared} bytes of dynamic shared memory for "
                              f"{kernel.name} (its limit: {kernel.max_dynamic_shared_size_bytes})")
    ledger = world.ledger
    ledger.launches += 1
    ledger.launch_args += nargs
    ledger.kernels.append((kernel.name, grid))
    if ledger.on_launch is not None:
        ledger.on_launch(function.ptr, grid, block, shared, stream, params)


class RawKernel:
    """``cupy.RawKernel``; compiles nothing. Attributes are an H200's for a 64-register kernel."""

    def __init__(self, code: str, name: str, options: tuple = (), backend: str = "nvrtc",
                 translate_cucomplex: bool = False, *, enable_cooperative_groups: bool = False,
                 jitify: Any = None) -> None:
        self.code, self.name, self.options, self.backend = code, name, tuple(options), backend
        self.num_regs, self.shared_size_bytes, self.const_size_bytes, self.local_size_bytes = 64, 0, 0, 0
        self.max_threads_per_block, self.ptx_version, self.binary_version, self.cache_mode_ca = 1024, 90, 90, 0
        self.max_dynamic_shared_size_bytes, self.preferred_shared_memory_carveout = 49152, -1
        self._functions: dict[tuple[_World, int], Function] = {}

    @property
    def attributes(self) -> dict:
        return {key: getattr(self, key) for key in (
            "max_threads_per_block", "shared_size_bytes", "const_size_bytes", "local_size_bytes", "num_regs",
            "ptx_version", "binary_version", "cache_mode_ca", "max_dynamic_shared_size_bytes",
            "preferred_shared_memory_carveout")}

    @property
    def kernel(self) -> Function:
        """The kernel loaded on the current device (CuPy loads it once per device)."""
        world = _w()
        key = (world, world.device())
        function = self._functions.get(key)
        if function is None:
            function = self._functions[key] = Function(self, key[1])
            world.functions[function.ptr] = function
        return function

    def __call__(self, grid: tuple, block: tuple, args: Any, *, shared_mem: int = 0,
                 stream: _BaseStream | None = None, enable_cooperative_groups: bool = False) -> None:
        world = _w()
        if not isinstance(grid, tuple) or not isinstance(block, tuple):
            raise TypeError(f"grid and block must be tuples, got {type(grid).__name__} and {type(block).__name__}")
        for arg in args:
            _kernel_argument(arg)
        stream_ptr = world.current_stream().ptr if stream is None else stream.ptr
        _launch(world, self.kernel, tuple(max(1, g) for g in (grid + (1, 1))[:3]),
                tuple(max(1, b) for b in (block + (1, 1))[:3]), int(shared_mem), stream_ptr, tuple(args), len(args))


class RawModule:
    """``cupy.RawModule``; ``get_function`` takes a name expression, or a name the code declares."""

    def __init__(self, code: str | None = None, *, path: str | None = None, options: tuple = (),
                 backend: str = "nvrtc", translate_cucomplex: bool = False, enable_cooperative_groups: bool = False,
                 name_expressions: Any = None, jitify: Any = None) -> None:
        if (code is None) == (path is None):
            raise TypeError("Exactly one of code and path keyword arguments must be given.")
        self.code, self.file_path, self.options, self.backend = code, path, tuple(options), backend
        self.name_expressions = tuple(name_expressions or ())

    def get_function(self, name: str) -> RawKernel:
        if name not in self.name_expressions and (self.code is None or
                                                  not re.search(rf"\b{re.escape(name)}\b", self.code)):
            raise CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        kernel = RawKernel(self.code or "", name, self.options, self.backend)
        kernel.kernel                                    # noqa: B018 (CuPy loads it here)
        return kernel


def _launch_kernel(f: int, grid_x: int, grid_y: int, grid_z: int, block_x: int, block_y: int, block_z: int,
                   shared: int, stream: int, kernel_params: int, extra: int) -> None:
    world = _w()
    function = world.functions.get(int(f))
    if function is None:
        raise CUDADriverError(f"CUDA_ERROR_INVALID_HANDLE: {f:#x} is no loaded kernel")
    _launch(world, function, (int(grid_x), int(grid_y), int(grid_z)), (int(block_x), int(block_y), int(block_z)),
            int(shared), int(stream), kernel_params)


# -- pinned host memory, NCCL --------------------------------------------------------------------

def empty_pinned(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    _w().ledger.pinned += 1
    a = _fresh(shape, dtype)
    return np.asfortranarray(a) if order == "F" else a


_HOST_ALLOCATIONS: dict[int, np.ndarray] = {}


def _host_alloc(size: int, flags: int) -> int:
    """``cudaHostAlloc``: pinned host memory (counted as ``pinned``); mapped at the same address."""
    _w().ledger.pinned += 1
    buf = np.full(max(int(size), 1), 0xFF, np.uint8)
    _HOST_ALLOCATIONS[buf.ctypes.data] = buf
    return buf.ctypes.data


def _free_host(ptr: int) -> None:
    _HOST_ALLOCATIONS.pop(int(ptr), None)


def _pointer_attributes(ptr: int) -> Any:
    """``cudaPointerGetAttributes`` of pinned host memory: under unified addressing the device
    pointer is the host pointer."""
    return types.SimpleNamespace(device=_get_device(), devicePointer=int(ptr), hostPointer=int(ptr), type=1)


_UNIQUE_IDS = itertools.count(1)


def _get_unique_id() -> bytes:
    return next(_UNIQUE_IDS).to_bytes(8, "little") + bytes(120)


class NcclCommunicator:
    """``cupy.cuda.nccl.NcclCommunicator``: counts ``allReduce`` calls and moves no data."""

    def __init__(self, ndev: int, commId: bytes, rank: int, config: Any = None) -> None:
        _w()
        if not isinstance(commId, bytes):
            raise TypeError(f"commId must be bytes (nccl.get_unique_id()), got {type(commId).__name__}")
        if len(commId) != 128:
            raise ValueError(f"commId length {len(commId)} != 128.")
        if not 0 <= rank < ndev:
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: rank {rank} of {ndev}")
        self._alive = True

    def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int, stream: int) -> None:
        for value in (sendbuf, recvbuf, count, datatype, op, stream):
            operator.index(value)                        # CuPy takes addresses and enums as C integers
        if not self._alive:
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: the communicator was destroyed or aborted")
        _w().ledger.nccl += 1

    def abort(self) -> None:
        self._alive = False


_NCCL_CONSTANTS = {"NCCL_SUM": 0, "NCCL_PROD": 1, "NCCL_MAX": 2, "NCCL_MIN": 3, "NCCL_AVG": 4, "NCCL_INT8": 0,
                   "NCCL_UINT8": 1, "NCCL_INT32": 2, "NCCL_UINT32": 3, "NCCL_INT64": 4, "NCCL_UINT64": 5,
                   "NCCL_FLOAT16": 6, "NCCL_FLOAT32": 7, "NCCL_FLOAT64": 8, "NCCL_DOUBLE": 8, "NCCL_BFLOAT16": 9}


# -- the modules ---------------------------------------------------------------------------------

def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name, f"{name} as the recording stand-in of cusyncbn._recording")

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(f"{name}.{attr} is not modelled by the recording CuPy stand-in (cusyncbn._recording)")

    module.__dict__.update(attributes, __getattr__=__getattr__)
    return module


def _modules() -> dict[str, types.ModuleType]:
    runtime = _module("cupy.cuda.runtime", getDevice=_get_device, setDevice=_set_device,
                      deviceSynchronize=_device_synchronize, getDeviceCount=_device_count,
                      getDeviceProperties=_device_properties, streamIsCapturing=_stream_is_capturing,
                      CUDARuntimeError=CUDARuntimeError, is_hip=False, streamLegacy=_LEGACY_STREAM,
                      hostAlloc=_host_alloc, freeHost=_free_host, pointerGetAttributes=_pointer_attributes,
                      hostAllocPortable=1, hostAllocMapped=2,
                      streamPerThread=_PER_THREAD_STREAM)
    driver = _module("cupy.cuda.driver", launchKernel=_launch_kernel, CUDADriverError=CUDADriverError)
    nccl = _module("cupy.cuda.nccl", available=True, get_unique_id=_get_unique_id,
                   NcclCommunicator=NcclCommunicator, NcclError=NcclError, **_NCCL_CONSTANTS)
    function = _module("cupy.cuda.function", CPointer=CPointer, Function=Function)
    cuda = _module("cupy.cuda", Device=Device, Stream=Stream, ExternalStream=ExternalStream, Event=Event,
                   MemoryPointer=MemoryPointer, get_current_stream=get_current_stream, get_device_id=_get_device,
                   is_available=lambda: True, runtime=runtime, driver=driver, nccl=nccl, function=function)
    cupy = _module("cupy", ndarray=ndarray, cuda=cuda, RawModule=RawModule, RawKernel=RawKernel,
                   empty=empty, zeros=zeros, ones=ones, full=full, empty_like=empty_like, zeros_like=zeros_like,
                   array=array, asarray=asarray, ascontiguousarray=ascontiguousarray, asnumpy=asnumpy,
                   from_dlpack=from_dlpack, __version__="14.2.0",
                   **{t: getattr(np, t) for t in ("float16", "float32", "float64", "int32", "int64", "uint32",
                                                  "uint64", "bool_")})
    cupyx = _module("cupyx", empty_pinned=empty_pinned)
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime, "cupy.cuda.driver": driver,
            "cupy.cuda.nccl": nccl, "cupy.cuda.function": function, "cupyx": cupyx}


_ABSENT = object()


@contextlib.contextmanager
def installed(device_count: int = 1) -> Iterator[Ledger]:
    """Within this block ``import cupy`` / ``cupyx`` give the recording stand-in (with
    ``device_count`` devices, device 0 current in every thread); yields its :class:`Ledger`.
    Whatever ``sys.modules`` held under those names before (or their absence) is restored on
    exit, and arrays or streams made inside cannot be used after it."""
    global _WORLD
    ledger = Ledger()
    modules = _modules()
    saved = {name: sys.modules.get(name, _ABSENT) for name in modules}
    previous, world = _WORLD, _World(ledger, int(device_count))
    sys.modules.update(modules)
    _WORLD = world
    try:
        yield ledger
    finally:
        _WORLD = previous
        for name, module in saved.items():
            if module is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# -- frames ----------------------------------------------------------------------------------------

def count_frames(fn: Callable[[], Any], package: str = "cusyncbn") -> int:
    """Python frames (``call`` events of ``sys.setprofile``) that one ``fn()`` runs in code of
    ``package`` (a package directory, or a single module's file), this file excepted."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ValueError(f"no package {package!r}")
    if spec.submodule_search_locations:
        roots = tuple(os.path.join(os.path.realpath(p), "") for p in spec.submodule_search_locations)
    else:
        roots = (os.path.realpath(spec.origin or ""),)
    own = os.path.realpath(__file__)
    inside: dict[str, bool] = {}
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            filename = frame.f_code.co_filename
            hit = inside.get(filename)
            if hit is None:
                real = os.path.realpath(filename)
                hit = inside[filename] = real != own and (real.startswith(roots) or real in roots)
            if hit:
                calls += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(previous)
    return calls
