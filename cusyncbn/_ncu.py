"""Nsight Compute's raw CSV (``ncu --csv --page raw``), read: one record per profiled kernel,
with its metrics, the byte counts in bytes, and the replay passes ncu reported for it.

What ncu writes there (to stdout, or to the file of ``--log-file``):

- its own lines, each beginning with ``==PROF==`` (or ``==WARNING==``, ``==ERROR==``), one per
  profiled kernel among them, ending in the replay passes that kernel took:
  ``==PROF== Profiling "moments_cs" - 0: 0%....50%....100% - 1 pass``;
- the table: a header row (``"ID","Process ID","Process Name","Host Name","Kernel Name",
  "Context","Stream","Block Size","Grid Size","Device","CC"``, then one column per metric), a
  row of units (empty for the fixed columns; ``byte``, or ``Kbyte``, ``Mbyte``, ... where ncu
  scaled a value, which ``--print-units base`` prevents), then one row per kernel in the order
  they ran, every cell quoted, numbers with thousands separators (``"205,520,896"``).

Where stdout was redirected into the file, the profiled program's own lines come with it.
Lines that are not part of the table are left out, whatever they are.
"""
from __future__ import annotations

import csv
import math
import re
from typing import NamedTuple

# Decimal prefixes, as ncu scales bytes (205.5 "Mbyte" for 205,520,896 bytes), and the binary
# ones for safety.
_BYTE_UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
               "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_PASSES = re.compile(r'^==PROF== Profiling "(?P<name>[^"]*)".*- (?P<passes>\d+) pass(?:es)?\s*$')


class Kernel(NamedTuple):
    """One profiled kernel launch: ncu's ID, its kernel name as printed, the grid as printed
    (``"(2, 256, 1)"``), metric name -> value (bytes for byte metrics; NaN where ncu printed
    none or no number), and column -> cell as printed, for messages."""
    id: int
    name: str
    grid: str
    metrics: dict
    cells: dict


class RawProfile(NamedTuple):
    """A raw CSV read: its kernels in the order they ran; the replay passes of each kernel ncu
    named in a ``==PROF== Profiling`` line, as ``(name, passes)`` in order (empty when the file has
    no such lines); and ncu's ``==WARNING==`` / ``==ERROR==`` lines."""
    kernels: list
    passes: list
    notes: list


def kernel_base(name: str) -> str:
    """A kernel's function name alone, whichever form ncu printed: ``moments_cs`` for
    ``moments_cs``, ``moments_cs<float, 4>`` and ``void moments_cs<float, 4>(const float *, ...)``;
    namespaces left out (``at::native::reduce_kernel<...>`` -> ``reduce_kernel``)."""
    name = name.strip()
    if name.startswith("void "):
        name = name[len("void "):]
    head = re.split(r"[<(]", name, maxsplit=1)[0].strip()
    return head.rsplit("::", 1)[-1]


def _number(cell: str, unit: str, column: str) -> float:
    """The value of a metric's cell, bytes for a byte unit; NaN for none ("", "n/a") or a cell
    that is no number."""
    try:
        value = float(cell.strip().replace(",", ""))
    except ValueError:
        return math.nan
    if unit.endswith("byte") or unit in _BYTE_UNITS:
        if unit not in _BYTE_UNITS:
            raise ValueError(f"column {column!r}: unknown unit {unit!r} (known: {', '.join(_BYTE_UNITS)})")
        value *= _BYTE_UNITS[unit]
    return value


def read_raw(text: str) -> RawProfile:
    """The kernels, replay passes and ncu's notes of ``text``, the output of ``ncu --csv --page
    raw``. Raises ValueError when it holds no table (naming ncu's warnings and errors, which say
    why: no kernel matched the filter, no permission to the counters, ...)."""
    passes, notes = [], []
    header = units = None
    kernels = []
    for line in text.splitlines():
        if line.startswith("=="):
            found = _PASSES.match(line)
            if found:
                passes.append((found["name"], int(found["passes"])))
            elif line.startswith(("==WARNING==", "==ERROR==")):
                notes.append(line.strip())
            continue
        if not line.startswith('"'):
            continue                                       # the program's own output
        cells = next(csv.reader([line]))
        if cells and cells[0] == "ID" and "Kernel Name" in cells:
            if header is not None and cells != header:
                raise ValueError("two tables with different columns in one file")
            header, units = cells, None
            continue
        if header is None or len(cells) != len(header):
            continue
        if cells[0] == "":
            units = cells                                  # the units row, right under the header
            continue
        if not cells[0].isdigit():
            continue
        row = dict(zip(header, cells))
        metrics = {column: _number(cell, units[i] if units else "", column)
                   for i, (column, cell) in enumerate(zip(header, cells)) if "__" in column}   # ncu's metric names
        kernels.append(Kernel(int(cells[0]), row["Kernel Name"], row.get("Grid Size", ""), metrics, row))
    if header is None:
        said = "; ".join(notes) or "nothing"
        raise ValueError(f"no ncu table (a header row \"ID\",...,\"Kernel Name\",...) in it; ncu said: {said}")
    kernels.sort(key=lambda k: k.id)
    return RawProfile(kernels, passes, notes)
