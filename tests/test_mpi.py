"""Launch tests/mpi_worker.py under mpiexec with 2 and 4 ranks (a plain pytest covers them)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from mpi_cases import CPU_CASES as CASES, GPU_CASES, NO_KERNEL_CASES

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 180


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


def test_case_lists_equal_the_workers_registry():
    registry = run_ranks(1, "--list")
    assert sorted(registry["cpu"]) == sorted(CASES) and len(set(CASES)) == len(CASES) == 23
    assert sorted(registry["gpu"]) == sorted(GPU_CASES) == ["torch_syncbatchnorm_numerics"]
    assert set(NO_KERNEL_CASES) < set(CASES)


# Every case that runs the layer's kernels, again with them emulated on the CPU.
EMU_CASES = [c for c in CASES if c not in NO_KERNEL_CASES]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("case", EMU_CASES)
def test_multi_rank_emulated_kernels(case, n):
    import cuda_emu
    cuda_emu.library()                     # build once here, not in every rank
    result = run_ranks(n, case, device="emu")
    assert result["size"] == n
    assert result["errors"] == [], "\n".join(result["errors"])


# The fused epilogue on an odd number of ranks too (1 rank: the in-process tests; 2 and 4 above).
FUSED_CASES = [c for c in CASES if "fused" in c]


@pytest.mark.parametrize("device", ["cpu", "emu"])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_multi_rank_fused_on_three_ranks(case, device):
    assert len(FUSED_CASES) == 2
    if device == "emu":
        import cuda_emu
        cuda_emu.library()
    result = run_ranks(3, case, device=device)
    assert result["size"] == 3
    assert result["errors"] == [], "\n".join(result["errors"])
