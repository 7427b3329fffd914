"""The ``stacklevel`` that makes a warning point at the user's line."""
from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside cusyncbn and outside the frameworks whose
    machinery calls it (torch's module call and autograd, Paddle's layers): reports arrive
    from whichever later call polls, at varying depths, and should point at the user's line."""
    skip = (_PACKAGE,) + tuple(_framework_dirs())
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _framework_dirs() -> list[str]:
    """The install directories of the frameworks already imported (torch, paddle)."""
    dirs = []
    for name in ("torch", "paddle"):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            dirs.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return dirs
