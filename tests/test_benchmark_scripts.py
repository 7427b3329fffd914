"""The scripts in benchmarks/ run as their docstrings say, on tiny inputs (their numbers are
not checked here: they are measurements, recorded in docs/PERFORMANCE.md)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_failures import mpiexec

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(*command, timeout=240):
    done = subprocess.run(list(command), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_cpu_vs_torch_runs_and_prints_a_row_per_case():
    pytest.importorskip("torch")
    out = run(sys.executable, "benchmarks/cpu_vs_torch.py", "--reps", "1", "--shapes", "2,4,3,3",
              "--dtypes", "float32")
    rows = [line for line in out.splitlines() if line.startswith("| (2, 4, 3, 3) | float32 |")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("x |"), out


@pytest.mark.slow
def test_allreduce_wait_runs_under_two_ranks():
    out = run(mpiexec(), "-n", "2", sys.executable, "benchmarks/allreduce_wait.py", "--reps", "1", "--channels", "4")
    assert out.count("rank 0 waited") == 10, out
