"""The debug agreement check: before a collective, all ranks compare what must match.

With ``debug=True`` every pass that would make a collective first makes one small
extra all-reduce of a table with one row per rank: whether validation failed there,
and the fields on which the ranks must agree for the collective to be correct. Every
rank then sees the same table and raises the same error, naming the field that
differs and each rank's value, instead of one rank raising and the others hanging.
Only what the collective needs is compared: per-rank batch and spatial sizes, input
dtypes and layer names may differ (the payload is float64 and O(C)).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._comm import set_tag

_FIELDS = ("collective number", "pass", "channel count", "statistics dtype", "mode")
_PASSES = {0: "forward", 1: "backward"}
_MODES = {0: "eval", 1: "train"}
_DTYPES = {0: "none", 1: "float32", 2: "float64"}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}


def record(tag: int, backward: bool, channels: int, stats_dtype: str | None, training: bool) -> tuple:
    """This rank's row of the table (without the error column)."""
    return (tag, int(backward), channels, _DTYPE_CODES.get(stats_dtype or "none", 0), int(training))


def _show(field: str, value: float) -> str:
    v = int(value)
    if field == "pass":
        return _PASSES.get(v, str(v))
    if field == "mode":
        return _MODES.get(v, str(v))
    if field == "statistics dtype":
        return _DTYPES.get(v, str(v))
    return str(v)


def agree(comm: Any, xp: Any, where: str, row: tuple, error: BaseException | None) -> None:
    """Exchange ``row`` (see :func:`record`) and whether validation failed here; raise on
    every rank when a rank failed or the ranks disagree. Returns when all is well."""
    width = 1 + len(_FIELDS)
    table = np.zeros(comm.size * width, dtype=np.float64)
    table[comm.rank * width:(comm.rank + 1) * width] = (1.0 if error is not None else 0.0,) + tuple(row)
    buf = xp.asarray(table)
    comm.allreduce(buf)
    rows = np.asarray(buf.get() if hasattr(buf, "get") else buf).reshape(comm.size, width)
    failed = [r for r in range(comm.size) if rows[r, 0] != 0.0]
    if failed or np.any(rows[:, 1:] != rows[0, 1:]):
        # Every rank raises below; all continue from the same collective number, so that a
        # program that handles the error on every rank can go on in step.
        set_tag(comm, int(rows[:, 1].max()))
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(f"{where} (debug): input validation failed on rank(s) {failed} (their own error says "
                           f"why); this rank ({comm.rank}) raises too so that no rank waits forever")
    differing = []
    for i, field in enumerate(_FIELDS, start=1):
        column = rows[:, i]
        if np.any(column != column[0]):
            values = ", ".join(f"rank {r}: {_show(field, column[r])}" for r in range(comm.size))
            differing.append(f"{field} ({values})")
    if differing:
        raise RuntimeError(f"{where} (debug): the ranks disagree on " + "; ".join(differing) +
                           f" (this is rank {comm.rank}); every rank must make the same collectives in the "
                           "same order")
