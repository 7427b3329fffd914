"""The host work of a layer call on the GPU code path stays within budget (cusyncbn._hostcost).

Counts, not times: the real CupyBackend, functional core and layer run against the
recording stand-in for CuPy (cusyncbn._recording), which counts per pass the launches,
NCCL calls, allocations, views, copies, events, device switches, stream lookups and
cusyncbn Python frames. Deterministic on any machine; the host time these counts predict
is printed by ``python -m cusyncbn._hostcost`` and compared with the measured one by the
benchmark on a GPU.
"""
import re
import subprocess
import sys

import pytest

from cusyncbn import _hostcost, _planned

LINE = re.compile(r"^ledger per training pass: launches (\d+), nccl (\d+), allocations (\d+), views (\d+), "
                  r"copies (\d+), events (\d+), device switches (\d+), stream lookups (\d+), frames (\d+)$")


def test_the_ledger_line_is_printed_last_and_within_budget():
    done = subprocess.run([sys.executable, "-m", "cusyncbn._hostcost"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    match = LINE.match(last)
    assert match, last
    counts = dict(zip(_hostcost.LEDGER_FIELDS, map(int, match.groups())))
    over = {k: (v, _hostcost.BUDGET[k]) for k, v in counts.items() if v > _hostcost.BUDGET[k]}
    assert not over, f"over budget (count, budget): {over}"
    assert "predicted host time per training pass" in done.stdout


def test_each_pass_of_the_planned_path():
    result = _hostcost.ledger()
    for name in ("forward", "backward"):
        counts = result[name]
        assert counts["launches"] == 2 and counts["launch_args"] == 0, (name, counts)   # pre-packed launches
        assert counts["nccl"] == 1 and counts["views"] == 0 and counts["copies"] == 0 and counts["events"] == 0
        assert counts["allocations"] == 1 and counts["device_switches"] == 0 and counts["stream_lookups"] == 1
    evaluation = result["eval"]
    assert evaluation["launches"] == 1 and evaluation["nccl"] == 0 and evaluation["allocations"] == 1


def test_a_fused_pass_stays_within_budget():
    """ReLU after a residual add, through the functional core's planned path: the same launches,
    NCCL call, stream lookup and (with dresidual into a given array, as an adapter passes its
    own tensors) allocations as a plain pass; a new dresidual is one allocation more, and only that."""
    result = _hostcost.ledger()
    counts = result["fused training pass"]
    over = {k: (counts[k], _hostcost.BUDGET[k]) for k in _hostcost.LEDGER_FIELDS if counts[k] > _hostcost.BUDGET[k]}
    assert not over, f"over budget (count, budget): {over}"
    for name in ("fused forward", "fused backward"):
        assert result[name]["launches"] == 2 and result[name]["launch_args"] == 0 and result[name]["nccl"] == 1
    new = dict(result["fused backward, new dresidual"])
    assert new.pop("allocations") == 2
    assert new == {k: v for k, v in result["fused backward"].items() if k != "allocations"}


def test_the_ledger_sees_the_full_path(monkeypatch):
    """Negative control: with planning off every call takes the full path, and the ledger
    shows its wrapped arguments, views and frames over the budget."""
    planned = _hostcost.ledger()["training pass"]
    monkeypatch.setattr(_planned, "enabled", False)
    _planned.clear()
    counts = _hostcost.ledger()["training pass"]
    assert counts["views"] > 0 and counts["frames"] > _hostcost.BUDGET["frames"]
    assert _hostcost.predicted_us(counts) > _hostcost.predicted_us(planned) + 20
    fused = _hostcost.ledger()["fused training pass"]
    assert fused["views"] > 0 and fused["frames"] > _hostcost.BUDGET["frames"]


def test_predicted_time_uses_the_h200_unit_costs():
    counts = dict.fromkeys(_hostcost.LEDGER_FIELDS, 0)
    counts.update(launches=2, launch_args=10, frames=10)
    assert _hostcost.predicted_us(counts) == pytest.approx(2 * 6.5 + 10 * 1.05 + 10 * 1.2)
