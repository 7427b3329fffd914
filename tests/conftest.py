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
    if _gpu_available():
        return
    skip = pytest.mark.skip(reason="no usable CUDA device (GPU tests run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
