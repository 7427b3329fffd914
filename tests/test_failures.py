"""A failing rank ends the whole job, quickly, with its error printed (cusyncbn._abort).

Each case runs tests/failure_scripts/rank_fails.py under ``mpiexec -n 2`` in a
subprocess (the hooks must never be installed in pytest's own process): the last rank
fails while rank 0 waits for it in an all-reduce. Without the hooks every failing case
here hangs until the timeout.
"""
import concurrent.futures
import functools
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from test_mpi import mpiexec

pytestmark = pytest.mark.slow                  # every test launches jobs (mpiexec) in subprocesses
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "failure_scripts", "rank_fails.py")
TIMEOUT_S = 60                  # a hang shows up as this timeout
ENDS_WITHIN_S = 30
RUNNERS = {"python": [], "python -m mpi4py": ["-m", "mpi4py"]}


def launch(case, runner="python", ranks=2, env=(), script=SCRIPT):
    """Run ``script``'s ``case``; returns (stdout + stderr, exit status, seconds)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CUSYNCBN_")}, **dict(env),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    launcher = [mpiexec(), "-n", str(ranks)] if ranks else []
    start = time.monotonic()
    # A session of its own: on a hang, the launcher and every rank are killed together.
    proc = subprocess.Popen([*launcher, sys.executable, *RUNNERS[runner], script, case], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{case} under {runner}: the job hung (killed after {TIMEOUT_S} s)\n{output[-3000:]}")
    return output, proc.returncode, time.monotonic() - start


def job(case, runner="python", ranks=2, env=()):
    """``launch``'s result. The first call starts every job below, four at a time: the
    tests then mostly collect results that are already there."""
    jobs = _jobs()
    key = (case, runner, ranks, env)
    if key not in jobs:
        jobs[key] = _POOL.submit(launch, *key)
    return jobs[key].result()


_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4)


@functools.lru_cache(maxsize=None)
def _jobs():
    specs = [(case, runner, 2, ()) for case in FAILURES for runner in RUNNERS]
    specs += [(case, "python", 2, ()) for case in ("exit_message", "thread", "nccl", "nccl_lengths", "opted_out")]
    specs += [("normal", runner, 2, ()) for runner in RUNNERS] + [("normal", "python", 2, NO_ABORT)]
    specs += [("normal", "python", 0, ()), ("exception", "python", 0, ())]
    return {spec: _POOL.submit(launch, *spec) for spec in specs}


NO_ABORT = (("CUSYNCBN_NO_ABORT", "1"),)
FAILURES = {
    # case: what the output must hold (the failing rank's error, and cusyncbn's note)
    "exception": ["Traceback", "RuntimeError: fails on purpose", "cusyncbn: rank 1 of 2 raised RuntimeError"],
    "exit": ["cusyncbn: rank 1 of 2 exits with status 3", "MPI_Abort(3)"],
    "bad_input": ["Traceback", "ValueError", "5", "cusyncbn: rank 1 of 2 raised ValueError"],
    "before_first": ["Traceback", "fails on purpose before its first collective",
                     "cusyncbn: rank 1 of 2 raised RuntimeError"],
    "channels": ["RuntimeError: cusyncbn: the ranks passed all-reduce buffers of different lengths",
                 "11 values (like a forward of 4 channels) on rank 0",
                 "13 values (like a forward of 5 channels) on rank 1", "num_features"],
}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", FAILURES)
def test_failing_rank_ends_the_job(case, runner):
    output, status, seconds = job(case, runner)
    assert status != 0 and seconds < ENDS_WITHIN_S, (status, seconds, output[-3000:])
    missing = [text for text in FAILURES[case] if text not in output]
    assert not missing, f"{missing} not in the output:\n{output[-3000:]}"


def test_exit_with_a_message_and_a_failing_thread_end_the_job():
    output, status, _ = job("exit_message")
    assert status != 0 and "gives up on purpose" in output and "exits with the message above" in output
    output, status, _ = job("thread")
    assert status != 0, output
    assert "RuntimeError: a thread fails on purpose" in output and "in thread 'loader'" in output, output


def test_nccl_communicator_is_aborted_before_mpi_and_checks_lengths():
    output, status, _ = job("nccl")
    assert status != 0, output
    assert "rank 1: ncclCommAbort" in output and "RuntimeError: fails on purpose with NCCLComm" in output, output
    assert output.index("rank 1: ncclCommAbort") < output.index("MPI_Abort(MPI_COMM_WORLD, 1)"), output
    output, status, _ = job("nccl_lengths")
    assert status != 0 and "11 values (like a forward of 4 channels) on rank 0; 13 values" in output, output


@pytest.mark.parametrize("runner", RUNNERS)
def test_normal_run_and_caught_exits_end_with_status_0(runner):
    output, status, _ = job("normal", runner)
    assert status == 0, output
    assert "rank 0: done (hooks installed: True)" in output and "rank 1: done (hooks installed: True)" in output
    assert "MPI_Abort" not in output and "cusyncbn: rank" not in output, output


def test_opting_out():
    output, status, _ = job("normal", env=NO_ABORT)
    assert status == 0 and output.count("(hooks installed: False)") == 2, output
    output, status, _ = job("opted_out")          # set_abort_on_failure(False): no MPI_Abort
    assert status != 0 and "RuntimeError: fails on purpose, opted out" in output, output
    assert "MPI_Abort" not in output and "cusyncbn: rank" not in output, output


def test_single_process_is_left_alone():
    output, status, _ = job("normal", ranks=0)
    assert status == 0 and "rank 0: done (hooks installed: False)" in output, output
    output, status, _ = job("exception", ranks=0)
    assert status == 1 and "RuntimeError: fails on purpose" in output, output
    assert "MPI_Abort" not in output and "cusyncbn: rank" not in output, output


def test_mpi_error_message_names_the_length_and_the_cause():
    """When MPI itself reports the mismatch (a length already checked once), the message
    still says what this rank passed and why MPI complains."""
    from cusyncbn._comm import _allreduce_failure

    class FakeMPIError(Exception):
        def Get_error_class(self):
            return 15

    comm = SimpleNamespace(rank=1, size=4, _mpi=SimpleNamespace(ERR_TRUNCATE=15))
    text = _allreduce_failure(comm, 35, FakeMPIError("Message truncated, error stack:\nMPI_Allreduce(...)"))
    assert text.startswith("cusyncbn: the all-reduce of 35 float64 values (like a forward of 16 channels)")
    assert "rank 1 of 4 (MPI: Message truncated, error stack:)" in text and "different lengths" in text
    assert "num_features" in text
