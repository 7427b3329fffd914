"""Whether forwards keep what a backward needs (``no_grad``), per thread."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

_state = threading.local()


@contextmanager
def no_grad() -> Iterator[None]:
    """Within this block, layer forwards keep nothing for a backward (inference loops).

    Example:
        >>> with cusyncbn.no_grad():            # doctest: +SKIP
        ...     y = bn(x)
    """
    previous = getattr(_state, "no_grad", False)
    _state.no_grad = True
    try:
        yield
    finally:
        _state.no_grad = previous


def recording() -> bool:
    """False inside :func:`no_grad`."""
    return not getattr(_state, "no_grad", False)
