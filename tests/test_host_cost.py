"""The per-call host work on the GPU code path stays within budget (cusyncbn._hostcost).

Counts, not times: the number of Python and C function calls one training
forward+backward (and one eval forward) makes through the real CuPy backend's host code
with the kernel launches stubbed. Deterministic on any machine; the wall time is
reported by ``python -m cusyncbn._hostcost`` and recorded in docs/PERFORMANCE.md.
"""
import pytest

from cusyncbn import _hostcost

# Measured 2026-11-26: 254 and 126. The margin absorbs Python/NumPy version differences;
# a new lookup, check or allocation per call shows up well before it.
BUDGET = {"training forward+backward": 290, "eval forward (no_grad)": 145}


@pytest.fixture
def host_passes():
    with _hostcost.stubbed():
        yield _hostcost.passes()


@pytest.mark.parametrize("name", list(BUDGET))
def test_calls_per_pass_within_budget(host_passes, name):
    calls = _hostcost.count_calls(host_passes[name])
    assert calls <= BUDGET[name], f"{name}: {calls} Python/C calls per pass, budget {BUDGET[name]}"


def test_the_count_sees_added_host_work(host_passes):
    step = host_passes["training forward+backward"]
    base = _hostcost.count_calls(step)

    def heavier():
        step()
        sorted(range(3))
        [abs(i) for i in range(40)]
    assert _hostcost.count_calls(heavier) >= base + 40
