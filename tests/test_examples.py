"""Smoke tests: every example runs as its header says and reports success."""
import os
import subprocess
import sys

import pytest

from test_mpi import mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("n", [2, 4])
def test_train_mpi(n):
    proc = run([mpiexec(), "-n", str(n), sys.executable, "examples/train_mpi.py", "--steps", "20", "--device", "cpu"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-> OK" in proc.stdout and f"{n} rank(s) on cpu" in proc.stdout


@pytest.mark.parametrize("n", [1, 2])
def test_jax_dlpack(n):
    pytest.importorskip("jax")
    proc = run([mpiexec(), "-n", str(n), sys.executable, "examples/jax_dlpack.py"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("-> OK") == n


def test_torch_convert():
    pytest.importorskip("torch")
    proc = run([mpiexec(), "-n", "2", sys.executable, "examples/torch_convert.py", "--steps", "10"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": OK" in proc.stdout
