"""A failing rank ends the job: the other ranks never wait for it in a collective.

MPI cannot see a Python exception. When one rank raises, or calls ``sys.exit(1)``, the
interpreter unwinds and calls ``MPI_Finalize``, which waits for ranks that are
themselves waiting in an all-reduce for the failed one: the job hangs. (MPICH's
``mpiexec`` ends a job only when a process dies without finalizing MPI: a signal,
``os._exit``.) ``python -m mpi4py script.py`` has the cure: it turns an uncaught
exception or a non-zero ``SystemExit`` into ``MPI_Abort``. cusyncbn does the same for a
plain ``python script.py`` as soon as it builds or adopts a communicator in a job of
several MPI processes (:func:`install`, called by ``MPIComm`` and ``NCCLComm``):

* An uncaught exception, in the main thread (``sys.excepthook``) or another thread
  (``threading.excepthook``): the hooks that were there before print the traceback,
  then a one-line note, stdout and stderr are flushed, NCCL communicators are aborted
  (``ncclCommAbort``: no kernel keeps waiting for a dead peer) and
  ``MPI.COMM_WORLD.Abort(1)`` ends every rank. Right away: ``atexit`` handlers and
  non-daemon threads, which could wait on the dead collective too, do not run.
* ``sys.exit(status)`` with a non-zero status (or a message): CPython calls no hook
  for ``SystemExit``, and an ``atexit`` handler cannot see the status. So cusyncbn's
  ``sys.exit`` raises a ``SystemExit`` subclass that notices when the interpreter
  itself discards it, i.e. when the program exits with it: its finalizer then runs
  with no Python frame left, before any ``atexit`` handler; a ``SystemExit`` that the
  program catches is discarded inside a frame and changes nothing. After the finally
  blocks have run, the job is aborted with that status. ``raise SystemExit(n)`` and the
  ``exit(n)`` builtin are not seen (``python -m mpi4py`` sees them).

Under ``python -m mpi4py`` these hooks act first (mpi4py's own abort, at the very end of
the interpreter's shutdown, is then never reached): the job ends the same way. Nothing
is installed in a single process or with ``CUSYNCBN_NO_ABORT=1``;
:func:`set_abort_on_failure` ``(False)`` makes installed hooks pass everything on. A hook
set later that does not call the one it replaces turns cusyncbn's off.
"""
from __future__ import annotations

import atexit
import builtins
import functools
import os
import sys
import threading
import weakref
from typing import Any

_ENV = "CUSYNCBN_NO_ABORT"
_enabled: bool | None = None                    # None: from the environment
_installed = False
_exiting = False                                # the interpreter has begun running its atexit handlers
_previous: dict[str, Any] = {}                  # the hooks replaced by ours, which ours chain to
_nccl_comms: "weakref.WeakSet[Any]" = weakref.WeakSet()


def set_abort_on_failure(enabled: bool) -> None:
    """Whether a failing rank ends the whole MPI job (the default) or only itself.

    With ``True`` (the default, unless ``CUSYNCBN_NO_ABORT=1``), an uncaught exception
    or ``sys.exit`` with a non-zero status on any rank prints that rank's traceback and
    ends every rank with ``MPI_Abort``, instead of leaving the others waiting in their
    next collective forever. The hooks that do it are installed when cusyncbn first
    builds or adopts a communicator over several MPI processes. With ``False`` they
    pass everything on to the hooks they replaced, as if absent (the program then
    handles failures itself, e.g. with its own ``MPI_Abort``).

    Args:
        enabled: True to end the job on a failure, False to leave it to the program.

    Raises:
        TypeError: ``enabled`` is not a bool.

    Example:
        >>> cusyncbn.set_abort_on_failure(False)                  # doctest: +SKIP
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_abort_on_failure takes True or False, got {enabled!r}")
    _enabled = enabled
    install()


def abort_on_failure() -> bool:
    """True when failures end the job (``set_abort_on_failure``, else ``CUSYNCBN_NO_ABORT``)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(_ENV, "").strip().lower() in ("", "0", "false", "no")


def install(nccl_comm: Any = None) -> None:
    """Install the hooks, once, when MPI runs several processes and failures should end the job.

    Args:
        nccl_comm: an NCCL communicator (with ``abort()``) to abort before MPI does.
    """
    global _installed
    if nccl_comm is not None:
        _nccl_comms.add(nccl_comm)
    if _installed or not abort_on_failure() or _world_size() < 2:
        return
    _previous.update(excepthook=sys.excepthook, thread_excepthook=threading.excepthook, exit=sys.exit)
    sys.excepthook, threading.excepthook = _excepthook, _thread_excepthook
    sys.exit = functools.wraps(_previous["exit"])(_exit)
    atexit.register(_at_exit)
    _installed = True


def _at_exit() -> None:
    global _exiting
    _exiting = True


def _world_size() -> int:
    mpi = _mpi()
    return mpi.COMM_WORLD.Get_size() if mpi is not None else 1


def _mpi() -> Any:
    """mpi4py's MPI module while MPI is initialised and not finalized, else None."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    return mpi


def _active() -> bool:
    return abort_on_failure() and _mpi() is not None


def _excepthook(exc_type: type, exc: BaseException, tb: Any) -> None:
    try:
        _previous["excepthook"](exc_type, exc, tb)
    finally:
        if _active():
            _abort(130 if issubclass(exc_type, KeyboardInterrupt) else 1, f"raised {exc_type.__name__}")


def _thread_excepthook(args: Any) -> None:
    try:
        _previous["thread_excepthook"](args)
    finally:
        # A thread may end itself with sys.exit(): threading ignores that, and so do we.
        if _active() and not issubclass(args.exc_type, builtins.SystemExit):
            where = "a thread" if args.thread is None else f"thread {args.thread.name!r}"
            _abort(1, f"raised {args.exc_type.__name__} in {where}")


class SystemExit(builtins.SystemExit):
    """What ``sys.exit`` raises once cusyncbn's hooks are installed: a ``SystemExit``
    that ends the job when the program exits with it (see the module docstring)."""

    def __del__(self) -> None:
        if _exiting or not _active() or threading.current_thread() is not threading.main_thread():
            return
        try:
            sys._getframe(1)
            return                                  # discarded by the program: caught
        except ValueError:
            pass                                    # by the interpreter: the program exits with it
        status = self.code
        if status is None or isinstance(status, int) and status == 0:
            return
        if isinstance(status, int):
            _abort(status % 256 or 1, f"exits with status {status}")
        print(status, file=sys.stderr)              # what the interpreter would print next
        _abort(1, "exits with the message above")


def _exit(status: Any = None) -> None:
    try:
        _previous["exit"](status)                   # raises SystemExit (or a hook's own exit)
    except builtins.SystemExit as exc:
        raise SystemExit(exc.code) from None


def end_job(status: int, what: str) -> bool:
    """End every rank as a failing rank does (note, NCCL aborted, ``MPI_Abort(status)``), if
    failures end the job and MPI runs; False (and nothing done) otherwise."""
    if not _active():
        return False
    _abort(status, what)
    return True


def _abort(status: int, what: str) -> None:
    """Print a note, flush, abort NCCL communicators, then ``MPI_Abort`` every rank."""
    mpi = _mpi()
    world = mpi.COMM_WORLD
    try:
        sys.stderr.write(f"cusyncbn: rank {world.Get_rank()} of {world.Get_size()} {what}; ending every rank "
                         f"with MPI_Abort({status}) so that none waits for it ({_ENV}=1 turns this off)\n")
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        for comm in list(_nccl_comms):
            try:
                comm.abort()
            except Exception:
                pass
        world.Abort(status)
