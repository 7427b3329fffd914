"""A stuck collective never hangs the job: timeouts, stall reports and early-exit notices.

A rank that makes one collective fewer than the others (a data loader one batch short, an
``if`` around a step, an early ``break``) leaves the others waiting in their last
all-reduce: the collective tags cannot see it, as both ranks' collectives are numbered
alike until one of them stops calling. Two mechanisms end such a job with a message:

* **Early-exit notices.** Each watched communicator has a side channel (a duplicate of its
  MPI communicator). When a rank's interpreter exits normally it posts the number of its
  last collective on that communicator to every other rank (non-blocking). A rank waiting
  in a collective numbered higher than what a finished rank completed knows it waits
  forever, and ends the job at once: ``rank 1 finished after collective 10 of its
  communicator; this rank waits in collective 11 (bn3, forward)``.
* **A timeout on every collective** (default 600 s, PyTorch's; ``CUSYNCBN_TIMEOUT`` in
  seconds, read at the first collective, or :func:`set_collective_timeout`, or a
  communicator's ``timeout=``). At half of it one stall report names the rank, the layer
  and pass, the collective's number, how long it has waited and which ranks are known to
  be elsewhere; at the timeout the job ends as when a rank fails (NCCL communicators
  aborted, ``MPI_Abort``, non-zero exit), or, when failures are left to the program
  (:func:`cusyncbn.set_abort_on_failure` ``(False)``), ``TimeoutError`` is raised.

On the CPU (MPI) the all-reduce is non-blocking and the calling thread waits for it in a
test loop that polls for 20 ms, then backs off (a stuck rank costs no spinning core): :func:`wait`. On the GPU (NCCL) the host never
waits in a collective: a watchdog thread (:class:`GpuWatchdog`) looks at the passes whose
report slot (``_flags``) has not been written, which happens only after the pass's
all-reduce, and ends the job the same way (``ncclCommAbort`` first, which unblocks the
kernel). Neither adds host work to a collective that completes.
"""
from __future__ import annotations

import atexit
import math
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable

ENV = "CUSYNCBN_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
EXIT_TAG = 23571                     # MPI tag of the early-exit notices on the side channels
NOTICE_EVERY_S = 0.05                # how often a waiting rank looks for notices
_timeout: float | None = None        # set_collective_timeout; None: the environment, else the default
_env_timeout: float | None = None    # CUSYNCBN_TIMEOUT, read at the first collective

#: What the calling thread's next collective is, for the messages: ``collective`` =
#: ``(layer name, "forward" / "backward", tag)``, set by the functional core before each
#: all-reduce.
current = threading.local()


def set_collective_timeout(seconds: float | None) -> None:
    """How long a collective may take before the job is ended, in seconds, for every
    communicator without a ``timeout=`` of its own (None: back to ``CUSYNCBN_TIMEOUT``, else
    600). At half of it a stall report is printed.

    Raises:
        ValueError: not a finite number > 0.

    Example:
        >>> import cusyncbn
        >>> cusyncbn.set_collective_timeout(120)
        >>> cusyncbn.set_collective_timeout(None)
    """
    global _timeout
    _timeout = None if seconds is None else check_timeout(seconds, "set_collective_timeout")


def check_timeout(seconds: Any, where: str) -> float:
    """``seconds`` as a float, or ValueError naming ``where``."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: the timeout must be a number of seconds > 0, got {seconds!r}") from None
    if isinstance(seconds, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: the timeout must be a number of seconds > 0, got {seconds!r}")
    return value


def collective_timeout(own: float | None = None) -> float:
    """The timeout in force: ``own`` (a communicator's), else :func:`set_collective_timeout`'s,
    else ``CUSYNCBN_TIMEOUT`` (read once), else 600 s."""
    global _env_timeout
    if own is not None:
        return own
    if _timeout is not None:
        return _timeout
    if _env_timeout is None:
        text = os.environ.get(ENV, "").strip()
        _env_timeout = check_timeout(text, ENV) if text else DEFAULT_TIMEOUT_S
    return _env_timeout


def _collective() -> tuple:
    return getattr(current, "collective", None) or ("a cusyncbn collective", "all-reduce", None)


class Watch:
    """The side channel of one communicator: the early-exit notices of its ranks.

    Args:
        mpi_comm: the communicator's MPI group (duplicated here: a collective call, made
            when the communicator is built, on every rank).
        final_tag: returns this rank's last collective number on the communicator.
        label: how messages name the communicator.
    """

    def __init__(self, mpi_comm: Any, final_tag: Callable[[], int], label: str) -> None:
        from mpi4py import MPI
        self._mpi = MPI
        self.side = mpi_comm.Dup()
        self.rank, self.size = self.side.Get_rank(), self.side.Get_size()
        self.final_tag, self.label = final_tag, label
        self.finished: dict[int, int] = {}        # rank -> its last collective, from notices
        self._lock = threading.Lock()
        self._sent = False
        _watches.add(self)
        _register_exit()

    def poll_notices(self) -> None:
        """Receive the notices that have arrived (never waits)."""
        mpi = self._mpi
        if mpi.Is_finalized():
            return
        with self._lock:
            status = mpi.Status()
            while self.side.Iprobe(source=mpi.ANY_SOURCE, tag=EXIT_TAG, status=status):
                source = status.Get_source()
                self.finished[source] = int(self.side.recv(source=source, tag=EXIT_TAG))

    def stranded(self, tag: int | None) -> tuple[int, int] | None:
        """``(rank, its last collective)`` of a rank that finished before collective ``tag``."""
        if tag is None:
            return None
        for rank, last in sorted(self.finished.items()):
            if last < tag:
                return rank, last
        return None

    def elsewhere(self) -> str:
        if not self.finished:
            return "none reported (a rank that has not finished reports nothing)"
        return ", ".join(f"rank {r} finished after collective {t}" for r, t in sorted(self.finished.items()))

    def notify_exit(self) -> None:
        """Post this rank's last collective number to every other rank (at interpreter exit)."""
        mpi = self._mpi
        if self._sent or self.size < 2 or mpi.Is_finalized():
            return
        self._sent = True
        final = int(self.final_tag())
        requests = [self.side.isend(final, dest=r, tag=EXIT_TAG) for r in range(self.size) if r != self.rank]
        deadline = time.monotonic() + 1.0            # small messages leave at once; never hang the exit
        while not mpi.Request.Testall(requests) and time.monotonic() < deadline:
            time.sleep(0.001)
        self.poll_notices()                          # the others' notices: received, not left behind


_watches: "weakref.WeakSet[Watch]" = weakref.WeakSet()
_exit_registered = False


def _register_exit() -> None:
    global _exit_registered
    if not _exit_registered:
        # Registered after mpi4py's own finalizer (MPI is initialized by now): runs before it.
        atexit.register(_notify_all)
        _exit_registered = True


def _notify_all() -> None:
    for watch in list(_watches):
        try:
            watch.notify_exit()
        except Exception:                            # the exit goes on whatever happens here
            pass


SPIN_S = 0.02        # seconds a waiting rank polls its request before it starts to sleep
MAX_SLEEP_S = 1e-3   # the longest sleep between two polls after that (the most a wait overshoots)


def wait(request: Any, watch: Watch | None, comm: Any, timeout: float | None = None,
         number: int | None = None) -> None:
    """Wait for the MPI ``request`` of one collective of ``comm``: a test loop that polls for
    :data:`SPIN_S` (a rank that arrives first on an uneven batch waits milliseconds, and a sleep
    would add up to its own length to that wait), then backs off from 50 us to
    :data:`MAX_SLEEP_S` (a stuck rank costs its peers no core), looking for early-exit notices
    every 50 ms, with a stall report at half the timeout and the end of the job at the timeout.
    ``number``: the collective's number on ``comm`` as ``watch``'s notices count them (default:
    the calling layer's tag)."""
    if request.Test():
        return
    spin_end = time.monotonic() + SPIN_S
    while time.monotonic() < spin_end:
        if request.Test():
            return
    limit = collective_timeout(timeout)
    start = now = time.monotonic()
    next_notice, delay, warned = start, 5e-5, False
    while not request.Test():
        now = time.monotonic()
        waited = now - start
        if watch is not None and now >= next_notice:
            next_notice = now + NOTICE_EVERY_S
            watch.poll_notices()
            gone = watch.stranded(_collective()[2] if number is None else number)
            if gone is not None:
                end(early_exit_message(watch, comm, gone, waited, number))
        if not warned and waited >= limit / 2:
            warned = True
            _stderr(stall_message(watch, comm, waited, limit, final=False, number=number))
        if waited >= limit:
            end(stall_message(watch, comm, waited, limit, final=True, number=number))
        time.sleep(delay)
        delay = min(delay * 2, MAX_SLEEP_S)


def _where(comm: Any, watch: Watch | None) -> str:
    rank = getattr(comm, "rank", watch.rank if watch else "?")
    size = getattr(comm, "size", watch.size if watch else "?")
    return f"rank {rank} of {size}"


def stall_message(watch: Watch | None, comm: Any, waited: float, limit: float, final: bool,
                  number: int | None = None) -> str:
    """The stall report (``final=False``, at half the timeout) or the timeout message."""
    name, what, tag = _collective()
    number = number if number is not None else "?" if tag is None else tag
    known = watch.elsewhere() if watch is not None else "unknown"
    head = (f"cusyncbn: {_where(comm, watch)} has waited {waited:.1f} s in collective {number} ({name}, {what}) "
            f"on {comm!r}; ranks known to be elsewhere: {known}")
    if final:
        return (f"{head}. The collective did not complete within the timeout of {limit:g} s ({ENV} or "
                "cusyncbn.set_collective_timeout): another rank is stuck or made fewer collectives; ending the job")
    return f"{head}. The job ends at {limit:g} s ({ENV}) if it does not complete"


def early_exit_message(watch: Watch, comm: Any, gone: tuple[int, int], waited: float, number: int | None = None
                       ) -> str:
    name, what, tag = _collective()
    tag = tag if number is None else number
    rank, last = gone
    return (f"cusyncbn: {_where(comm, watch)}: rank {rank} finished after collective {last} of its communicator "
            f"({comm!r}); this rank waits in collective {tag} ({name}, {what}) since {waited:.1f} s, which can "
            "never complete (a rank made fewer training steps: a data loader one batch short, a break, a "
            "condition around a step); ending the job")


def _stderr(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def end(message: str) -> None:
    """End the job because of a stuck collective: the message on stderr, then as a failing
    rank (NCCL communicators aborted, ``MPI_Abort``); with failures left to the program
    (``set_abort_on_failure(False)``), ``TimeoutError`` in the calling thread instead."""
    from . import _abort
    _stderr(message)
    if not _abort.end_job(1, "had a stuck collective"):
        raise TimeoutError(message)


class GpuWatchdog:
    """The watch on NCCL passes: a daemon thread looks, every ``period`` seconds, at the
    passes whose report slot has not been written (``_flags.pending_entries``); a pass's
    slot is written by the kernel that runs after its all-reduce, so a pass that stays
    unwritten is stuck in (or behind) its collective. Early-exit notices end the job at
    once, a pass older than half the timeout gets one stall report, one older than the
    timeout ends the job (the NCCL communicators are aborted first, which unblocks the
    kernel). The forward and backward themselves are untouched: no host synchronization."""

    def __init__(self, period: float | None = None, start: bool = True) -> None:
        self._period = period
        self._warned: set = set()
        self._thread = threading.Thread(target=self._run, name="cusyncbn-watchdog", daemon=True)
        if start:
            self._thread.start()

    def _run(self) -> None:
        while True:
            limit = collective_timeout()
            time.sleep(self._period or min(1.0, limit / 20))
            try:
                message = self.check(time.monotonic(), limit)
            except Exception:                         # the watch must never kill the process itself
                message = None
            if message is not None:
                end(message)
                return

    def check(self, now: float, limit: float) -> str | None:
        """What to do now: None, or the message to end the job with (a stall report is
        printed here). One pass per communicator is looked at: its oldest unwritten one."""
        from . import _flags
        oldest: dict[int, tuple] = {}
        for entry in _flags.pending_entries():
            info = entry.info
            if info is None or entry.written():
                continue
            oldest.setdefault(id(info[2]), (entry, info))
        for entry, (name, what, comm, tag) in oldest.values():
            watch = getattr(comm, "watch", None)
            waited = now - entry.claimed
            previous = getattr(current, "collective", None)
            current.collective = (name, what, tag)
            try:
                own = getattr(comm, "timeout", None)
                limit_here = limit if own is None else own
                if watch is not None:
                    if _threads_may_call_mpi():
                        watch.poll_notices()
                    gone = watch.stranded(tag)
                    if gone is not None:
                        return early_exit_message(watch, comm, gone, waited)
                if waited >= limit_here:
                    return stall_message(watch, comm, waited, limit_here, final=True)
                if waited >= limit_here / 2 and entry.seq not in self._warned:
                    self._warned.add(entry.seq)
                    _stderr(stall_message(watch, comm, waited, limit_here, final=False))
            finally:
                current.collective = previous
        return None


def _threads_may_call_mpi() -> bool:
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and \
        mpi.Query_thread() == mpi.THREAD_MULTIPLE


_gpu_watchdog: GpuWatchdog | None = None


def watch_gpu_passes() -> None:
    """Start the GPU watchdog thread (once per process)."""
    global _gpu_watchdog
    if _gpu_watchdog is None:
        _gpu_watchdog = GpuWatchdog()
