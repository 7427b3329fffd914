"""A stuck collective never hangs the job (cusyncbn._watchdog).

Under ``mpiexec -n 2`` (tests/failure_scripts/stuck_rank.py, launched with a hard timeout
by test_failures.launch): a rank that makes one step fewer ends the job at once through
its early-exit notice; a rank stuck in user code ends it at the timeout, after a stall
report at half of it; a rank that is merely slow does not. Then the pieces alone: the
timeout setting and the GPU watchdog's decisions on stand-in passes.
"""
import concurrent.futures
import os

import numpy as np
import pytest

import cusyncbn
from cusyncbn import _flags, _watchdog
from test_failures import HERE, launch

SCRIPT = os.path.join(HERE, "failure_scripts", "stuck_rank.py")
FIVE = (("CUSYNCBN_TIMEOUT", "5"),)
DEFAULT = (("CUSYNCBN_TIMEOUT", "600"),)
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
_runs: dict = {}


def run(case, env):
    """The job's (output, status, seconds); all of this module's jobs start on the first call."""
    if not _runs:
        for spec in (("skip_step", FIVE), ("skip_step", DEFAULT), ("stuck", FIVE), ("slow", FIVE)):
            _runs[spec] = _pool.submit(launch, spec[0], "python", 2, spec[1], SCRIPT)
    return _runs[(case, env)].result()


@pytest.mark.parametrize("env", [FIVE, DEFAULT], ids=["timeout 5 s", "timeout 600 s"])
@pytest.mark.slow
def test_a_rank_one_step_short_ends_the_job_at_once_naming_both_collectives(env):
    output, status, seconds = run("skip_step", env)
    assert status != 0 and seconds < 15, (status, seconds, output[-3000:])
    # 6 steps: collectives 1-2 the first forward (it finds the pivot), 3 its backward, then 2 a step.
    assert "rank 1 finished after collective 11 of its communicator" in output, output[-3000:]
    assert "this rank waits in collective 12 (bn3, forward)" in output, output[-3000:]
    assert "did not complete within the timeout" not in output         # the notice, not the timeout
    assert "rank 1: done, running mean right: True" in output


@pytest.mark.slow
def test_a_rank_stuck_in_user_code_ends_the_job_at_the_timeout_after_a_stall_report():
    output, status, seconds = run("stuck", FIVE)
    assert status != 0 and seconds < 5 + 10, (status, seconds, output[-3000:])
    stall = "cusyncbn: rank 0 of 2 has waited 2."
    assert stall in output and "The job ends at 5 s (CUSYNCBN_TIMEOUT)" in output, output[-3000:]
    assert "collective 6 (bn3, forward)" in output and "did not complete within the timeout of 5 s" in output
    assert output.index(stall) < output.index("did not complete within the timeout")
    assert "MPI_Abort(1)" in output


@pytest.mark.slow
def test_a_slow_rank_is_no_false_alarm():
    output, status, _ = run("slow", FIVE)
    assert status == 0, output[-3000:]
    assert output.count("running mean right: True") == 2, output[-3000:]
    assert "cusyncbn: rank" not in output, output[-3000:]


# -- the pieces -------------------------------------------------------------------------------

@pytest.fixture
def timeout_state(monkeypatch):
    monkeypatch.setattr(_watchdog, "_timeout", None)
    monkeypatch.setattr(_watchdog, "_env_timeout", None)
    monkeypatch.delenv(_watchdog.ENV, raising=False)


def test_the_timeout_setting(timeout_state, monkeypatch):
    assert _watchdog.collective_timeout() == 600.0
    monkeypatch.setattr(_watchdog, "_env_timeout", None)
    monkeypatch.setenv(_watchdog.ENV, "12.5")
    assert _watchdog.collective_timeout() == 12.5
    cusyncbn.set_collective_timeout(30)
    assert _watchdog.collective_timeout() == 30 and _watchdog.collective_timeout(own=7) == 7
    cusyncbn.set_collective_timeout(None)
    assert _watchdog.collective_timeout() == 12.5
    for bad in (0, -1, float("nan"), float("inf"), "soon", True):
        with pytest.raises(ValueError, match="seconds > 0"):
            cusyncbn.set_collective_timeout(bad)
    monkeypatch.setattr(_watchdog, "_env_timeout", None)
    monkeypatch.setenv(_watchdog.ENV, "never")
    with pytest.raises(ValueError, match="CUSYNCBN_TIMEOUT"):
        _watchdog.collective_timeout()


class StandInWatch:
    """The side channel of a communicator, with notices already received."""

    rank, size = 0, 2

    def __init__(self, finished=None):
        self.finished = dict(finished or {})

    def poll_notices(self):
        pass

    stranded = _watchdog.Watch.stranded
    elsewhere = _watchdog.Watch.elsewhere


class StandInNccl:
    rank, size, timeout = 0, 2, None

    def __init__(self, watch):
        self.watch = watch

    def __repr__(self):
        return "NCCLComm(rank=0, size=2, device=0)"


@pytest.fixture
def ring():
    _flags.queue.clear()
    yield _flags.host_ring(8)
    _flags.queue.clear()


def test_the_gpu_watchdog_reports_a_stalled_pass_then_ends_the_job(ring, timeout_state, capsys):
    comm = StandInNccl(StandInWatch())
    dog = _watchdog.GpuWatchdog(start=False)
    address, seq = _flags.claim(ring, lambda bits: None, ("bn3", "backward", comm, 7))
    claimed = _flags.pending_entries()[0].claimed
    assert dog.check(claimed + 2.0, 5.0) is None and capsys.readouterr().err == ""    # young: nothing
    assert dog.check(claimed + 3.0, 5.0) is None
    report = capsys.readouterr().err
    assert "rank 0 of 2 has waited 3.0 s in collective 7 (bn3, backward) on NCCLComm" in report
    assert dog.check(claimed + 4.0, 5.0) is None and capsys.readouterr().err == ""    # one report per pass
    message = dog.check(claimed + 6.0, 5.0)
    assert message is not None and "did not complete within the timeout of 5 s" in message
    ring.host[(address - ring.address) // 8] = np.uint64(seq << 24)                     # the pass got through
    assert dog.check(claimed + 60.0, 5.0) is None


def test_the_gpu_watchdog_ends_the_job_when_a_rank_finished_before_a_pending_collective(ring, timeout_state):
    comm = StandInNccl(StandInWatch({1: 10}))
    dog = _watchdog.GpuWatchdog(start=False)
    _flags.claim(ring, lambda bits: None, ("bn3", "forward", comm, 10))   # rank 1 took part in #10
    claimed = _flags.pending_entries()[0].claimed
    assert dog.check(claimed + 0.1, 600.0) is None
    _flags.queue.clear()
    _flags.claim(ring, lambda bits: None, ("bn3", "forward", comm, 11))
    message = dog.check(claimed + 0.1, 600.0)
    assert "rank 1 finished after collective 10" in message and "waits in collective 11 (bn3, forward)" in message


class _LateRequest:
    """A stand-in MPI request that completes ``after`` seconds from its creation."""

    def __init__(self, after: float) -> None:
        import time
        self.done_at = time.monotonic() + after
        self.tests = 0

    def Test(self) -> bool:  # noqa: N802 (mpi4py's name)
        import time
        self.tests += 1
        return time.monotonic() >= self.done_at


def test_a_wait_polls_before_it_sleeps_then_backs_off(monkeypatch):
    """A collective that completes within the polling window is seen at once (no sleep adds to
    the wait of a rank that arrived first); a longer one is waited for with sleeps of at most
    MAX_SLEEP_S, returning no later than that after it completes."""
    import time
    sleeps = []
    real_sleep = time.sleep
    monkeypatch.setattr(_watchdog.time, "sleep", lambda s: (sleeps.append(s), real_sleep(s)))
    short = _LateRequest(_watchdog.SPIN_S / 4)
    _watchdog.wait(short, None, object(), timeout=10)
    assert sleeps == [] and short.tests > 1
    late = _LateRequest(_watchdog.SPIN_S + 0.03)
    _watchdog.wait(late, None, object(), timeout=10)
    overshoot = time.monotonic() - late.done_at
    assert sleeps and max(sleeps) <= _watchdog.MAX_SLEEP_S
    assert overshoot < _watchdog.MAX_SLEEP_S + 0.02      # one sleep, plus a loaded machine's slack
