"""A stand-in for the few CuPy / NCCL calls of ``cusyncbn._nccl``, so that the NCCL
bootstrap and fallback logic (unique id broadcast, duplicate-GPU detection, warning
and MPI fallback) is tested under mpiexec on machines without a GPU. It does not
pretend to move data: the GPU tests do that through real NCCL.
"""
import contextlib
import sys
import types


class FakeNcclCommunicator:
    def __init__(self, size, uid, rank):
        self.size, self.uid, self.rank = size, uid, rank


@contextlib.contextmanager
def installed(rank, uuid="GPU-same-on-every-rank", nccl_available=True):
    """``import cupy`` gives the fake inside the block (the real one is restored after)."""
    cupy, cuda, nccl = (types.ModuleType(n) for n in ("cupy", "cupy.cuda", "cupy.cuda.nccl"))

    class Device:
        def __init__(self, index=0):
            self.id = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cuda.Device = Device
    cuda.runtime = types.SimpleNamespace(getDeviceProperties=lambda index: {"uuid": uuid.encode()})
    cuda.get_current_stream = lambda device_id=-1: types.SimpleNamespace(ptr=0)
    nccl.available = nccl_available
    nccl.get_unique_id = lambda: ("unique id made by rank", rank)
    nccl.NcclCommunicator = FakeNcclCommunicator
    nccl.NCCL_FLOAT64, nccl.NCCL_SUM = 7, 0
    cuda.nccl, cupy.cuda = nccl, cuda
    saved = {name: sys.modules.get(name) for name in ("cupy", "cupy.cuda", "cupy.cuda.nccl")}
    sys.modules.update({"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": nccl})
    try:
        yield nccl
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
