"""The recording CuPy stand-in (cusyncbn._recording) counts what it says it counts.

Each count comes with its pair: the call that must move it and a neighbour that must not
(a view next to an allocation, the launch path with arguments next to the one without).
The last tests run the real GPU backend and layer on it.
"""
import inspect
import sys
import types
import warnings

import numpy as np
import pytest

import cusyncbn
from cusyncbn import _recording
from cusyncbn._backend import ForwardPayload, Stats, swap_backend

NAMES = ("cupy", "cupy.cuda", "cupy.cuda.runtime", "cupy.cuda.driver", "cupy.cuda.nccl", "cupy.cuda.function", "cupyx")


def counts(ledger, fn):
    """The counters ``fn()`` moved (only the non-zero ones)."""
    ledger.reset()
    fn()
    return {k: v for k, v in ledger.snapshot().items() if v}


@pytest.fixture
def ledger():
    with _recording.installed(device_count=2) as ledger:
        yield ledger


@pytest.fixture
def cupy(ledger):
    import cupy
    return cupy


def kernel(cupy, name="k"):
    return cupy.RawModule(code=f"extern \"C\" __global__ void {name}() {{}}").get_function(name)


# -- installation ---------------------------------------------------------------------------------

def test_modules_are_the_stand_in_inside_and_absent_again_after(monkeypatch):
    for name in NAMES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with _recording.installed() as ledger:
        import cupy
        import cupyx
        from cupy.cuda import nccl, runtime
        assert cupy.ndarray is _recording.ndarray and cupyx.empty_pinned is _recording.empty_pinned
        assert nccl is cupy.cuda.nccl and runtime.getDeviceCount() == 1
        assert isinstance(ledger, _recording.Ledger)
    for name in NAMES:
        assert name not in sys.modules


def test_modules_that_were_there_are_put_back(monkeypatch):
    there = types.ModuleType("cupy")
    monkeypatch.setitem(sys.modules, "cupy", there)
    monkeypatch.delitem(sys.modules, "cupyx", raising=False)
    with _recording.installed():
        assert sys.modules["cupy"] is not there
    assert sys.modules["cupy"] is there and "cupyx" not in sys.modules


def test_objects_made_inside_refuse_to_work_after():
    with _recording.installed():
        import cupy
        a = cupy.empty((3,), "f4")
    with pytest.raises(RuntimeError, match="outside installed"):
        a.get()


def test_unmodelled_cupy_api_says_so(cupy):
    assert not hasattr(cupy, "linalg")
    with pytest.raises(AttributeError, match="not modelled"):
        cupy.cuda.get_elapsed_time                          # noqa: B018 (timing is not modelled)


def test_reset_and_snapshot(ledger, cupy):
    cupy.empty((2,), "f4")
    assert ledger.snapshot()["allocations"] == 1 and set(ledger.snapshot()) == set(_recording.COUNTERS)
    ledger.reset()
    assert not any(ledger.snapshot().values()) and ledger.kernels == []


# -- arrays -----------------------------------------------------------------------------------------

def test_empty_is_one_allocation_and_no_view(ledger, cupy):
    box = []
    assert counts(ledger, lambda: box.append(cupy.empty((4,), "f4"))) == {"allocations": 1}
    a = box[0]
    assert isinstance(a, cupy.ndarray) and a.shape == (4,) and a.dtype == np.float32 and a.nbytes == 16
    assert a.data.ptr % 256 == 0 and a.data.device_id == 0 and a.flags.c_contiguous
    assert np.isnan(a.get()).all()                          # fresh memory is garbage, not zeros


def test_slice_is_a_view_and_fancy_index_an_allocation(ledger, cupy):
    a = cupy.zeros((4,), "f4")
    box = []
    assert counts(ledger, lambda: box.append(a[1:3])) == {"views": 1}
    assert box[0].data.ptr == a.data.ptr + 4 and box[0].base is a
    assert counts(ledger, lambda: a[[0, 2]]) == {"allocations": 1, "builtin_ops": 1}


def test_reshape_is_a_view_unless_it_must_copy(ledger, cupy):
    a = cupy.zeros((4, 6), "f4")
    assert counts(ledger, lambda: a.reshape(2, 4, 3)) == {"views": 1}
    assert counts(ledger, lambda: a.ravel()) == {"views": 1}
    assert counts(ledger, lambda: a[:, ::2].reshape(-1)) == {"views": 2}        # one stride fits: still a view
    cut = a[:, :3]
    assert counts(ledger, lambda: cut.reshape(-1)) == {"allocations": 1, "builtin_ops": 1}


def test_ascontiguousarray_returns_a_contiguous_array_itself(ledger, cupy):
    a = cupy.zeros((4, 6), "f4")
    box = []
    assert counts(ledger, lambda: box.append(cupy.ascontiguousarray(a))) == {}
    assert box[0] is a
    strided = a[:, ::2]
    assert counts(ledger, lambda: cupy.ascontiguousarray(strided)) == {"allocations": 1, "builtin_ops": 1}
    with pytest.raises(TypeError):
        cupy.ascontiguousarray(np.zeros(3))


def test_astype_allocates_only_when_it_converts(ledger, cupy):
    a = cupy.zeros((3,), "f4")
    assert counts(ledger, lambda: a.astype(np.float32, copy=False)) == {}
    assert counts(ledger, lambda: a.astype(np.float64)) == {"allocations": 1, "builtin_ops": 1}


def test_host_data_crosses_with_a_copy(ledger, cupy):
    host = np.arange(3.0)
    box = []
    assert counts(ledger, lambda: box.append(cupy.array(host))) == {"allocations": 1, "copies": 1}
    assert counts(ledger, lambda: cupy.asarray(box[0])) == {}
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(box[0])


def test_device_property_builds_a_device_object(ledger, cupy):
    a = cupy.zeros((3,), "f4")
    assert counts(ledger, lambda: a.device) == {"device_objects": 1}
    assert counts(ledger, lambda: a.data.ptr) == {}


class GpuProducer:
    """A foreign array (as torch's CUDA tensors are) in host memory that says it lives on GPU 0."""

    def __init__(self, a):
        self.a, self.streams = a, []

    @property
    def shape(self):
        return self.a.shape

    def __dlpack_device__(self):
        return 2, 0

    def __dlpack__(self, stream=None, max_version=None, copy=None):
        self.streams.append(stream)
        return self.a.__dlpack__(max_version=max_version, copy=copy)


def test_from_dlpack_of_a_foreign_gpu_buffer_is_a_view(ledger, cupy):
    host = np.arange(6, dtype=np.float32)
    producer = GpuProducer(host)
    box = []
    # dlpack.pyx (v14.2.0) from_dlpack: setDevice(dev_id), the producer's __dlpack__, setDevice(prev)
    assert counts(ledger, lambda: box.append(cupy.from_dlpack(producer))) == {"views": 1, "device_switches": 2}
    assert producer.streams == [1]                        # the legacy default stream, CuPy's current one
    box[0][0] = 7.0
    assert host[0] == 7.0 and box[0].device.id == 0       # the same memory, no copy
    with pytest.raises(TypeError, match="CPU arrays cannot be directly imported"):
        cupy.from_dlpack(np.zeros(3))


def test_real_backend_imports_foreign_gpu_arrays(gpu_backend):
    import cupy
    from cusyncbn._backend_factory import get_backend
    backend = get_backend("gpu:0")
    producer = GpuProducer(np.ones((2, 4, 3), np.float32))
    gpu_backend.reset()
    x = backend.import_array(producer, "x")
    assert isinstance(x, cupy.ndarray) and gpu_backend.views == 1 and gpu_backend.allocations == 0
    with pytest.raises(ValueError, match="host array"):
        backend.import_array(np.ones(3, np.float32), "x")


def test_dlpack_export_is_a_host_copy_or_nothing(ledger, cupy):
    from cusyncbn._dlpack import framework_of, to_host
    a = cupy.full((3,), 2.0, "f4")
    ledger.reset()
    with pytest.raises(BufferError):
        np.from_dlpack(a)                                 # a CUDA buffer: NumPy cannot take it
    assert counts(ledger, lambda: np.from_dlpack(a, device="cpu")) == {"copies": 1, "syncs": 1}
    assert framework_of(a) == "cupy"
    assert counts(ledger, lambda: to_host(a)) == {"copies": 1, "syncs": 1, "device_switches": 2,
                                                  "device_objects": 1}


# -- copies to the host -------------------------------------------------------------------------------

def test_async_get_into_pinned_memory_is_one_copy_and_no_sync(ledger, cupy):
    import cupyx
    a = cupy.full((2,), 3.0, "f4")
    box = []
    assert counts(ledger, lambda: box.append(cupyx.empty_pinned((2,), np.float32))) == {"pinned": 1}
    host = box[0]
    stream = cupy.cuda.get_current_stream()
    # core.pyx (v14.2.0) get(): setDevice(self.device.id), the copy, setDevice(prev)
    assert counts(ledger, lambda: a.get(stream=stream, out=host, blocking=False)) == {
        "copies": 1, "device_switches": 2, "device_objects": 1}
    assert host.tolist() == [3.0, 3.0]
    assert counts(ledger, lambda: a.get(out=host)) == {"copies": 1, "device_switches": 2, "device_objects": 1,
                                                     "syncs": 1}


def test_synchronizing_under_capture_raises(ledger, cupy):
    a = cupy.zeros((2,), "f4")
    host = np.empty(2, np.float32)
    ledger.capturing = True
    assert cupy.cuda.get_current_stream().is_capturing()
    a.get(out=host, blocking=False)
    with pytest.raises(_recording.CUDARuntimeError, match="Capture"):
        a.get(out=host)


def test_set_is_a_copy(ledger, cupy):
    a = cupy.zeros((2,), "f8")
    assert counts(ledger, lambda: a.set(np.ones(2))) == {"copies": 1, "device_switches": 2, "device_objects": 1}
    assert cupy.asnumpy(a).tolist() == [1.0, 1.0]


# -- devices, streams, events ----------------------------------------------------------------------

def test_entering_the_current_device_switches_once_on_exit(ledger, cupy):
    # CuPy v14.2.0 cupy/cuda/device.pyx, Device.__enter__: `id = runtime.getDevice()`, push it,
    # `if self.id != id: runtime.setDevice(self.id)`; Device.__exit__:
    # `runtime.setDevice(_ThreadLocalStack.get().pop())`, unconditionally.
    device = cupy.cuda.Device(0)

    def enter():
        with device:
            pass
    assert counts(ledger, enter) == {"device_switches": 1}
    assert counts(ledger, lambda: cupy.cuda.Device(0)) == {"device_objects": 1}


def test_entering_another_device_switches_twice(ledger, cupy):
    def enter():
        with cupy.cuda.Device(1):
            assert cupy.cuda.runtime.getDevice() == 1
            assert cupy.empty((1,), "f4").data.device_id == 1
    assert counts(ledger, enter) == {"device_switches": 2, "device_objects": 1, "allocations": 1}
    assert cupy.cuda.runtime.getDevice() == 0
    with pytest.raises(_recording.CUDARuntimeError):
        cupy.cuda.runtime.setDevice(2)


def test_device_synchronize_and_compute_capability(ledger, cupy):
    device = cupy.cuda.Device(0)
    assert device.attributes["MultiProcessorCount"] == 132
    assert counts(ledger, device.synchronize) == {"syncs": 1, "device_switches": 2}
    assert counts(ledger, lambda: device.compute_capability) == {"device_switches": 2}
    assert counts(ledger, lambda: device.compute_capability) == {}      # cached per device, as CuPy does


def test_streams_are_current_per_device_and_thread(ledger, cupy):
    assert counts(ledger, lambda: cupy.cuda.get_current_stream().is_capturing()) == {
        "stream_lookups": 1, "capture_queries": 1}
    assert cupy.cuda.get_current_stream().ptr == 0
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        assert cupy.cuda.get_current_stream() is stream and cupy.cuda.get_current_stream(1).ptr == 0
    assert cupy.cuda.get_current_stream().ptr == 0
    with pytest.raises(RuntimeError, match="does not match"):
        with cupy.cuda.Device(1):
            with stream:
                pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with cupy.cuda.ExternalStream(1234, 0):
            assert cupy.cuda.get_current_stream().ptr == 1234


def test_events(ledger, cupy):
    event = cupy.cuda.Event(block=False, disable_timing=True)
    assert counts(ledger, lambda: event.record(cupy.cuda.Stream.null)) == {"events": 1}
    assert counts(ledger, lambda: event.done) == {"events": 1}
    assert counts(ledger, event.synchronize) == {"events": 1, "syncs": 1}


# -- kernels ---------------------------------------------------------------------------------------

def test_raw_kernel_call_counts_a_launch_and_its_arguments(ledger, cupy):
    k = kernel(cupy)
    a = cupy.zeros((4,), "f4")
    args = (a, np.int32(4), np.float64(1.0), None, a)
    assert counts(ledger, lambda: k((2,), (128,), args, shared_mem=64)) == {"launches": 1, "launch_args": 5}
    assert ledger.kernels == [("k", (2, 1, 1))]
    assert k.attributes["num_regs"] == 64 and k.attributes["shared_size_bytes"] == 0


def test_driver_launch_counts_a_launch_without_arguments(ledger, cupy):
    k = kernel(cupy)
    ptr = k.kernel.ptr
    assert counts(ledger, lambda: cupy.cuda.driver.launchKernel(ptr, 3, 2, 1, 64, 1, 1, 0, 0, 0, 0)) == {
        "launches": 1}
    assert ledger.kernels == [("k", (3, 2, 1))]
    with pytest.raises(_recording.CUDADriverError, match="INVALID_HANDLE"):
        cupy.cuda.driver.launchKernel(ptr + 1, 1, 1, 1, 32, 1, 1, 0, 0, 0, 0)


def test_a_refused_launch_is_not_counted(ledger, cupy):
    k = kernel(cupy)
    ledger.reset()
    with pytest.raises(TypeError, match="numpy.ndarray of shape"):
        k((1,), (32,), (np.zeros(4),))                    # a host array where a device pointer belongs
    with pytest.raises(TypeError):
        k([1], [32], ())                                  # CuPy takes tuples only
    with pytest.raises(_recording.CUDADriverError):
        k((1,), (2048,), ())                              # over the block limit
    with pytest.raises(_recording.CUDADriverError):
        k((1,), (32,), (), shared_mem=64 * 1024)          # over 48 KiB without the opt-in attribute
    assert ledger.launches == 0 and ledger.kernels == []


def test_on_launch_sees_every_launch(ledger, cupy):
    k = kernel(cupy)
    seen = []
    ledger.on_launch = lambda *launch: seen.append(launch)
    a = cupy.zeros((2,), "f4")
    k((1,), (32,), (a,))
    cupy.cuda.driver.launchKernel(k.kernel.ptr, 1, 1, 1, 32, 1, 1, 16, 0, 1234, 0)
    assert seen == [(k.kernel.ptr, (1, 1, 1), (32, 1, 1), 0, 0, (a,)),
                    (k.kernel.ptr, (1, 1, 1), (32, 1, 1), 16, 0, 1234)]


def test_get_function_needs_a_name_the_module_has(cupy):
    module = cupy.RawModule(code="template <int N> __global__ void f() {}", name_expressions=["f<1>"])
    assert module.get_function("f<1>").name == "f<1>"
    with pytest.raises(_recording.CUDADriverError, match="NOT_FOUND"):
        module.get_function("g<1>")


# -- NCCL ----------------------------------------------------------------------------------------

def test_nccl_all_reduce_is_counted_and_moves_nothing(ledger, cupy):
    from cupy.cuda import nccl
    uid = nccl.get_unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128
    comm = nccl.NcclCommunicator(1, uid, 0)
    buf = cupy.full((3,), 2.0, "f8")
    assert counts(ledger, lambda: comm.allReduce(buf.data.ptr, buf.data.ptr, 3, nccl.NCCL_FLOAT64, nccl.NCCL_SUM,
                                                 0)) == {"nccl": 1}
    assert buf.get().tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(TypeError):
        comm.allReduce(buf, buf, 3, nccl.NCCL_FLOAT64, nccl.NCCL_SUM, 0)  # addresses, not arrays
    with pytest.raises(TypeError):
        nccl.NcclCommunicator(1, (1, 2), 0)               # CuPy 14 takes the 128 bytes of get_unique_id
    with pytest.raises(ValueError):
        nccl.NcclCommunicator(1, b"short", 0)


# -- frames ----------------------------------------------------------------------------------------

def test_count_frames_counts_package_frames_only(ledger, cupy):
    from cusyncbn import _rules
    assert _recording.count_frames(lambda: _rules.channel_last("NCHW")) == 1
    assert _recording.count_frames(lambda: sorted(range(5), key=abs)) == 0
    assert _recording.count_frames(lambda: cupy.empty((3,), "f4")) == 0       # the stand-in's own frames
    assert _recording.count_frames(lambda: _rules.channel_last("NCHW"), package="numpy") == 0


# -- the real GPU code on the stand-in -------------------------------------------------------------

@pytest.fixture
def gpu_backend():
    """``gpu:0`` builds its backend anew under the stand-in; the previous one comes back after."""
    previous = swap_backend("gpu:0", None)
    try:
        with _recording.installed() as ledger:
            try:
                yield ledger
            finally:
                cusyncbn.functional.flush_reports()               # nothing pending may outlive the stand-in
                swap_backend("gpu:0", None)
    finally:
        swap_backend("gpu:0", previous)


def test_real_backend_forward_is_two_launches(gpu_backend):
    import cupy
    from cusyncbn._backend_cupy import CupyBackend
    ledger = gpu_backend
    backend = CupyBackend(0)
    x3 = cupy.array(np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32))
    y3 = cupy.empty(x3.shape, np.float32)
    rm, rv = cupy.zeros((4,), np.float32), cupy.ones((4,), np.float32)
    w, b = cupy.ones((4,), np.float32), cupy.zeros((4,), np.float32)
    buf = cupy.empty((ForwardPayload.size(4),), np.float64)
    stats = Stats(cupy.empty((Stats.size(4),), np.float32), buf, 4)
    ledger.reset()
    backend.local_moments(x3=x3, pivot_state=cupy.zeros((4,), np.float64), tag=1, buf=buf)
    arguments = dict(x3=x3, buf=buf, tag=1, ranks=1, running_mean=rm, running_var=rv, momentum=0.9, eps=1e-5,
                     unbiased=False, weight=w, bias=b, stats=stats, y3=y3)
    accepted = inspect.signature(backend.normalize_batch).parameters
    backend.normalize_batch(**{k: v for k, v in arguments.items() if k in accepted})
    assert ledger.launches == 2 and len(ledger.kernels) == 2
    assert [name.split("_")[0] for name, _ in ledger.kernels] == ["moments", "normalize"]
    assert ledger.nccl == 0 and ledger.copies == 0 and ledger.syncs == 0


def test_real_layer_runs_on_the_stand_in(gpu_backend):
    import cupy
    ledger = gpu_backend
    bn = cusyncbn.SyncBatchNorm(4, data_format="NCL", device="gpu:0", comm=cusyncbn.SingleProcessComm())
    x = cupy.array(np.random.default_rng(1).normal(size=(2, 4, 3)).astype(np.float32))
    dy = cupy.ones((2, 4, 3), np.float32)
    for _ in range(2):                                   # the second pass runs on the cached plans
        ledger.reset()
        y = bn(x)
        forward = ledger.snapshot()
        ledger.reset()
        bn.backward(dy)
        backward = ledger.snapshot()
        assert isinstance(y, cupy.ndarray) and y.shape == x.shape and y.device.id == 0
        for counted in (forward, backward):
            assert counted["launches"] >= 1            # every pass is kernels, whatever the launch path
            assert counted["nccl"] == 0                # a single-process communicator makes no collective
            assert counted["syncs"] == 0               # and no pass waits for the device
