import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def _gpu_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    # Tests named *multi_rank* launch ranks with mpiexec (tests/test_mpi.py, test_paddle.py,
    # test_torch_dropin.py, test_gpu.py): slow, as the other tests marked so; the quick run
    # (python -m pytest -m "not slow") leaves them out.
    for item in items:
        if "multi_rank" in item.name:
            item.add_marker(pytest.mark.slow)
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="no usable CUDA device (GPU tests run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def use_backend():
    """``use_backend(backend, device="cpu")``: ``backend`` serves ``device`` until the test ends
    (``cusyncbn._backend.swap_backend``, then the previous one back). Returns ``backend``."""
    from cusyncbn._backend import swap_backend
    swapped = []

    def use(backend, device="cpu"):
        swapped.append((device, swap_backend(device, backend)))
        return backend
    yield use
    for device, previous in reversed(swapped):
        swap_backend(device, previous)


@pytest.fixture(autouse=True)
def _no_report_outlives_its_test():
    """A pass's findings on an (emulated) GPU are reported by a later call into cusyncbn: what
    a test leaves pending (a negative control's broken kernel, say) is dropped when it ends,
    so that it cannot surface in the next test. Tests about reports flush them themselves."""
    yield
    from cusyncbn import _flags
    import warnings
    while _flags.queue:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _flags.flush()
            except (RuntimeError, FloatingPointError):
                pass
