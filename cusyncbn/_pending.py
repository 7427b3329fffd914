"""A backward with no forward to back-propagate, as the other ranks see it.

A layer's backward takes the most recent of its forwards not yet back-propagated. When
there is none, this rank raises. With ``debug`` the other ranks' next pass makes the
debug vote before its collective (``_debug``), and would wait for this rank forever: so
this rank first casts the vote its backward would have cast (a backward of the layer's
channels and statistics dtype, on the communicator's next collective number) with the
error, and every rank raises, the others naming this one.
"""
from __future__ import annotations

from typing import NoReturn

from . import _debug
from ._backend_factory import get_backend
from ._comm import Communicator, next_tag


def raise_no_pending_forward(where: str, comm: Communicator | None = None, channels: int = 0,
                             stats_dtype: str | None = None, device: str = "cpu") -> NoReturn:
    """Raise the error of a backward with no pending forward; with ``comm`` (a debug layer's
    communicator in training), first take part in the debug vote of the other ranks' passes.

    Args:
        where: the layer's name (the message starts with it).
        comm: the communicator whose ranks vote, or None (no vote: without debug, in eval,
            or for a layer that does not sync). Over one process there is nobody to tell.
        channels: the layer's channel count, ``stats_dtype`` its statistics' dtype name
            ('float32' / 'float64'), ``device`` where its arrays live (the vote's buffer
            lives there too).

    Raises:
        RuntimeError: always, on this rank; with a vote, the other ranks raise in it too.

    Example:
        >>> raise_no_pending_forward("bn1")                     # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: bn1: backward() called with no pending forward (each forward outside ...)
    """
    error = RuntimeError(f"{where}: backward() called with no pending forward (each forward outside "
                         "cusyncbn.no_grad() can be back-propagated once)")
    if comm is not None and comm.size > 1:
        row = _debug.record(next_tag(comm), True, channels, stats_dtype, True)
        _debug.agree(comm, get_backend(device).xp, where, row, error)
    raise error
