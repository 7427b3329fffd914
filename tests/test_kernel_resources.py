"""Registers, spills and occupancy of every kernel, read from its sm_90 CUBIN (no GPU needed).

NVRTC compiles the kernels for a real architecture and cuobjdump reads the resources; the
register counts read this way match Nsight Compute's on an H200. A kernel that spills (stack
or local memory) or whose register and shared-memory use leaves less than half the SM's
threads resident, at the block size the host launches it with, fails here before it reaches
a GPU. The numbers are in docs/KERNELS.md.
"""
import pytest

from cusyncbn import _kernels, _tuning

pytestmark = pytest.mark.slow                  # NVRTC and cuobjdump: tens of seconds
pytest.importorskip("cupy", reason="CuPy (the test extra installs cupy-cuda12x) is needed for NVRTC")
import kernel_resources as kr  # noqa: E402

if kr.tool("cuobjdump") is None:
    pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)", allow_module_level=True)

OCCUPANCY_FLOOR = 0.5          # reductions and elementwise passes alike


@pytest.fixture(scope="module", params=list(_kernels.CTYPES))
def table(request):
    return request.param, kr.resources(request.param)


def test_every_instantiation_is_reported(table):
    dtype, res = table
    assert set(res) == set(_kernels.name_expressions(dtype).values())


def test_no_kernel_spills(table):
    _, res = table
    spills = {expr: r for expr, r in res.items() if r.stack or r.local}
    assert not spills, f"stack or local memory (register spills): {spills}"


@pytest.mark.parametrize("threads", [256, _kernels.MAX_THREADS])
def test_occupancy_floor(table, threads):
    """At every block size the plans use (256 channel-second, 512 channel-last by default,
    up to MAX_THREADS when tuned), at least half of the SM's threads are resident."""
    _, res = table
    low = {expr: kr.occupancy(r.registers, threads, r.shared - _tuning.SM90.reserved_shared + _shared(expr, threads))
           for expr, r in res.items()}
    low = {e: f"{o:.0%}" for e, o in low.items() if o < OCCUPANCY_FLOOR}
    assert not low, f"below {OCCUPANCY_FLOOR:.0%} theoretical occupancy at {threads} threads: {low}"


def _shared(expr: str, threads: int) -> int:
    """The dynamic shared memory of the widest launch the heuristic makes of ``expr``."""
    kind, layout = expr.split("<")[0].split("_")
    vec = int(expr.rstrip(">").split(",")[-1])
    lanes = 32 if layout == "cl" else 1
    while lanes > 1 and _tuning.shared_bytes(kind, layout, threads, lanes, vec) > _tuning.MAX_DYNAMIC_SHARED:
        lanes //= 2
    return _tuning.shared_bytes(kind, layout, threads, lanes, vec)


def test_hot_loops_hold_batches_of_16_byte_loads():
    """The full-batch loops of the 16-byte-vector kernels issue CUSYNCBN_LOADS 16-byte loads
    per streamed array before using them (the register budget above keeps them in flight)."""
    if kr.tool("nvdisasm") is None:
        pytest.skip("cuobjdump -sass needs nvdisasm (pip install nvidia-cuda-nvdisasm)")
    code = kr.sass("float32")
    for expr, arrays in (("moments_cs<float, 4>", 1), ("backward_cl<float, float, 4>", 2),
                         ("normalize_cl<float, float, 4>", 1)):
        _, loads = kr.hot_loop(code[expr])
        assert loads == arrays * _kernels.LOADS, expr
