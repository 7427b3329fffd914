"""Every kernel instantiation compiles with NVRTC (no GPU needed: this runs in CI)."""
import re

import pytest

from cusyncbn import _kernels

pytestmark = pytest.mark.slow                  # NVRTC: tens of seconds
pytest.importorskip("cupy", reason="CuPy (the test extra installs cupy-cuda12x) is needed")
from cupy.cuda import nvrtc  # noqa: E402  (works without a GPU or driver)


@pytest.mark.parametrize("arch", _kernels.ARCHITECTURES)
@pytest.mark.parametrize("dtype_name", list(_kernels.CTYPES))
def test_every_instantiation_compiles(dtype_name, arch):
    names = list(_kernels.name_expressions(dtype_name).values())
    prog = nvrtc.createProgram(_kernels.source(), "syncbn.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *_kernels.options()])
        except nvrtc.NVRTCError as exc:
            pytest.fail(f"NVRTC failed for {dtype_name} on {arch}: {exc}\n{nvrtc.getProgramLog(prog)}")
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        assert all(lowered.values()) and len(set(lowered.values())) == len(names)
        assert nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_compile_time_settings_come_from_python():
    """The block-size bound and the loads in flight are defined once, in _kernels, and passed
    with -D: the source has no value of its own (it refuses to compile without them)."""
    source = _kernels.source()
    for setting in ("CUSYNCBN_MAX_THREADS", "CUSYNCBN_MIN_THREADS_PER_SM", "CUSYNCBN_LOADS"):
        assert f"-D{setting}=" in " ".join(_kernels.options())
        assert not re.search(rf"#define {setting}\b", source)
    prog = nvrtc.createProgram(source, "syncbn.cu", [], [])
    try:
        with pytest.raises(nvrtc.NVRTCError):
            nvrtc.compileProgram(prog, ["-arch=compute_90", "--std=c++17"])
    finally:
        nvrtc.destroyProgram(prog)
