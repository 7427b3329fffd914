"""Launch tests/mpi_worker.py under mpiexec with 2 and 4 ranks (a plain pytest covers them)."""
import json
import os
import shutil
import subprocess
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 180
# Case names, read from the worker's source (importing it would initialise MPI in pytest).
_SOURCE = open(os.path.join(HERE, "mpi_worker.py")).read()
CASES = re.findall(r"^@case\ndef (\w+)", _SOURCE, re.M)
GPU_CASES = re.findall(r"^@gpu_case\ndef (\w+)", _SOURCE, re.M)        # run by test_gpu.py


def mpiexec() -> str:
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = local if os.path.exists(local) else shutil.which("mpiexec")
    if not found:
        pytest.fail("mpiexec not found: install the test extra (pip install -e '.[test]' brings mpich)")
    return found


def run_ranks(n: int, case: str, device: str = "cpu") -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    launcher = mpiexec()
    version = subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout
    extra = ["--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    proc = subprocess.run([launcher, "-n", str(n), *extra, sys.executable, "-m", "mpi4py",
                           os.path.join(HERE, "mpi_worker.py"), case, device],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"mpiexec -n {n} {case} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_multi_rank(case, n):
    result = run_ranks(n, case)
    assert result["size"] == n
    assert result["errors"] == [], "\n".join(result["errors"])


# Every case that runs the layer's kernels, again with them emulated on the CPU.
EMU_CASES = [c for c in CASES if c not in ("nccl_bootstrap_and_fallback", "allreduce_gradients_sums_and_averages",
                                           "bad_input_raises_before_any_collective")]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("case", EMU_CASES)
def test_multi_rank_emulated_kernels(case, n):
    import cuda_emu
    cuda_emu.library()                     # build once here, not in every rank
    result = run_ranks(n, case, device="emu")
    assert result["size"] == n
    assert result["errors"] == [], "\n".join(result["errors"])
