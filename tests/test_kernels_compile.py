"""Every kernel instantiation compiles with NVRTC (no GPU needed: this runs in CI)."""
import pytest

from cusyncbn import _kernels

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
            nvrtc.compileProgram(prog, [f"-arch={arch}", *_kernels.OPTIONS])
        except nvrtc.NVRTCError as exc:
            pytest.fail(f"NVRTC failed for {dtype_name} on {arch}: {exc}\n{nvrtc.getProgramLog(prog)}")
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        assert all(lowered.values()) and len(set(lowered.values())) == len(names)
        assert nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_host_and_kernels_agree_on_the_channel_last_block_size():
    """__launch_bounds__(CL_THREADS) in syncbn.cu must cover the blocks the host launches."""
    import re

    from cusyncbn import _backend_cupy
    defined = re.search(r"#define CL_THREADS (\d+)", _kernels.source())
    assert defined and int(defined.group(1)) == _backend_cupy._CL_THREADS
