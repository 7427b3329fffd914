"""Launch configurations of the CUDA kernels: a heuristic, a table measured per GPU, overrides.

A ``LaunchConfig`` says how one pass (``moments``, ``normalize``, ``backward``, ``dx``) is
launched: block size, channel-last lanes, how many waves of blocks, a cap on the vector
width and the loads in flight. ``CupyBackend`` takes, in order, an override set with
``set_launch_config``, the entry of the shipped table ``_kernels/tuning.json`` for this GPU
(compute capability and SM count) and this exact (pass, layout, dtype, shape), or the
heuristic below. ``cusyncbn._sweep.run_sweep`` measures the table on a GPU.

Which kernels run a pass (``layout_for``): "cs", one channel's slab per block (channel-second
input with long rows), or "cl", row tiles (channel-last input, and channel-second input with
short rows, whose rows of C * B values hold several channels each; docs/KERNELS.md).

The grid heuristic (``launch_grid``) fills the GPU: every SM holds as many blocks as its
registers, threads and shared memory allow (a *wave*), and every block grid-strides over its
share. Slab grids take one wave, or one block per channel when there are more channels. Row-tile
grids are chosen among block sizes, lanes and splits for the best product of two fractions:
the wave efficiency (blocks over the waves they take, times a wave: a last wave a quarter full
wastes three quarters of it) and the work per thread (vectors per thread over the loads a
thread keeps in flight, at most 1: a thread with one vector to load spends its block's set-up
on it). More splits than that only add split partials to merge.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple

from . import _kernels

TABLE_PATH = os.path.join(os.path.dirname(__file__), "_kernels", "tuning.json")
MAX_GRID_Y = 65535
MAX_DYNAMIC_SHARED = 48 * 1024       # without the opt-in attribute
COALESCED_BYTES = 128                # a warp's row segment: lanes * vector bytes at least this
SLAB_THREADS = 256                   # the slab kernels' default block
ROW_THREADS = (512, 256, 128, 64, 32)  # the row-tile block sizes the heuristic tries, its default first
MAX_COLUMNS = (1 << 31) - (1 << 25)  # row tiles index the C * B columns of a row with 32-bit ints
MIN_SPLIT_BYTES = 128                # a row-tile split reads at least this per column: 8x the partial it writes


class LaunchConfig(NamedTuple):
    threads: int = 0        # threads per block; 0: 256 channel-second, 512 channel-last
    lanes: int = 0          # channel-last: threads along channels (power of two <= 32); 0: heuristic
    waves: float = 1.0      # blocks = waves x resident blocks per SM x SMs (bounded by the work)
    vec: int = 0            # cap on elements per vector; 0: the widest the data allows
    loads: int = 4          # 16-byte loads in flight per array and thread (compile-time)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._asdict())


DEFAULT = LaunchConfig()


class SMLimits(NamedTuple):
    """Per-SM limits of the occupancy calculation (sm_90: H100 / H200)."""
    registers: int = 65536
    threads: int = 2048
    blocks: int = 32
    shared: int = 228 * 1024
    register_unit: int = 256        # registers are allocated per warp in units of this
    reserved_shared: int = 1024     # per block, by the system


SM90 = SMLimits()


def resident_blocks(registers: int, threads: int, shared: int, limits: SMLimits = SM90) -> int:
    """Blocks of ``threads`` threads using ``registers`` per thread and ``shared`` bytes of
    shared memory (static and dynamic, without the system's reserve) that fit on one SM."""
    warps = -(-threads // 32)
    unit = limits.register_unit
    per_warp = -(-max(registers, 1) * 32 // unit) * unit
    by_registers = (limits.registers // per_warp) // warps
    by_threads = limits.threads // (warps * 32)
    by_shared = limits.shared // (shared + limits.reserved_shared)
    return max(0, min(by_registers, by_threads, by_shared, limits.blocks))


def lanes_for(channels: int, vec: int, itemsize: int) -> int:
    """Channel-last threads along channels: enough for a warp's row segments to be whole
    128-byte lines, no more than the channels need."""
    lanes = 1
    while lanes < 32 and lanes * vec * itemsize < COALESCED_BYTES and lanes * vec < channels:
        lanes *= 2
    return lanes


def block_shape(layout: str, config: LaunchConfig, channels: int, vec: int, itemsize: int) -> tuple[int, int]:
    """(lanes, threads) of a launch: 1-D blocks channel-second, (lanes, rows) channel-last."""
    threads = config.threads or (512 if layout == "cl" else 256)
    if layout == "cs":
        return 1, threads
    lanes = config.lanes or lanes_for(channels, vec, itemsize)
    return min(lanes, 32, threads), threads


def shared_bytes(kind: str, layout: str, threads: int, lanes: int, vec: int) -> int:
    """Dynamic shared memory: the reductions' block-sum scratch and tile (doubles), the
    elementwise passes' per-channel coefficients (4 per channel)."""
    channels = lanes * vec if layout == "cl" else 1
    if kind in ("moments", "backward"):
        items = channels * 2
        return 8 * (max((threads // 32) * items, threads) + items)
    return 8 * 4 * channels


def vector_width(extent: int, dtype_name: str, misalign: int, cap: int = 0) -> int:
    """The widest vector (in elements) the kernels have for ``dtype_name`` that divides ``extent``
    and that the arrays' alignment allows (``misalign``: their addresses OR-ed together, modulo
    16), at most ``cap`` (0: no cap)."""
    itemsize = _kernels.ITEMSIZE[dtype_name]
    return next(v for v in _kernels.vector_widths(dtype_name)
                if (cap == 0 or v <= cap) and extent % v == 0 and misalign % (v * itemsize) == 0)


def layout_for(shape3: tuple[int, int, int], dtype_name: str, misalign: int = 0) -> str:
    """The kernels of a pass over ``shape3`` = (A, C, B): "cl" (row tiles) or "cs" (slabs).

    Channel-last input (B == 1) takes row tiles. Channel-second input takes them too when its
    rows are short: when a row of C * B values takes a wider vector than a channel's B values
    (B = 49 in (64, 2048, 7, 7): slabs load one element at a time, row tiles 16 bytes, a vector
    crossing from one channel's row into the next's), or when a channel has fewer vectors than
    a slab block has threads. Empty input and rows of 2^31 values or more keep the slabs."""
    a, c, b = shape3
    if b == 1:
        return "cl"
    if a == 0 or b == 0 or c * b >= MAX_COLUMNS:
        return "cs"
    slab = vector_width(b, dtype_name, misalign)
    row = vector_width(c * b, dtype_name, misalign)
    return "cl" if row > slab or a * b < SLAB_THREADS * slab else "cs"


class Launch(NamedTuple):
    grid: tuple[int, int]       # slabs: (splits, channels); row tiles: (tiles, splits)
    block: tuple[int, int]      # slabs: (threads, 1); row tiles: (lanes, rows)
    shared: int                 # dynamic shared memory, bytes


def launch_grid(kind: str, layout: str, shape3: tuple[int, int, int], vec: int, itemsize: int,
                config: LaunchConfig, fit: Callable[[int, int], int], sms: int) -> Launch:
    """Grid, block and dynamic shared memory of pass ``kind`` over ``shape3`` = (A, C, B) with
    ``vec``-element vectors. ``fit(threads, shared)``: the blocks of that many threads and bytes
    of dynamic shared memory one SM holds with the kernel's registers; ``sms``: the GPU's
    multiprocessors. Splits are bounded so that every thread has at least one vector."""
    a, c, b = shape3
    if layout == "cs":
        threads = config.threads or SLAB_THREADS
        shared = shared_bytes(kind, layout, threads, 1, vec)
        if a * b == 0:
            return Launch((1, 1), (threads, 1), shared)
        slots = max(1, round(config.waves * fit(threads, shared) * sms))
        useful = -(-(a * b // vec) // threads)
        splits = max(1, min(round(slots / c), useful, MAX_GRID_Y))
        return Launch((splits, min(c, MAX_GRID_Y)), (threads, 1), shared)
    return _row_tiles(kind, shape3, vec, itemsize, config, fit, sms)


def _row_tiles(kind: str, shape3: tuple[int, int, int], vec: int, itemsize: int, config: LaunchConfig,
               fit: Callable[[int, int], int], sms: int) -> Launch:
    """The row-tile launch of the best score (wave efficiency x work per thread, see the module
    docstring) among the block sizes (``ROW_THREADS``, or the configuration's), the lanes from
    the fewest that coalesce up to 32 (or the configuration's) and, per shape, the splits that
    fill a whole number of waves most closely; ties go to the first tried (the default block
    size, the fewest lanes and splits). A split reads at least ``MIN_SPLIT_BYTES`` per column."""
    a, c, b = shape3
    columns = c * b
    fewest = lanes_for(columns, vec, itemsize)
    batch = min(8, max(1, config.loads * 16 // (vec * itemsize)))
    if kind == "dx":
        batch = max(1, batch // 2)                    # dx_cl: half the loads per array (Io::batch2)
    best: tuple[float, Launch] | None = None
    for threads in (config.threads,) if config.threads else ROW_THREADS:
        tried = set()
        for lanes in (config.lanes,) if config.lanes else (1, 2, 4, 8, 16, 32):
            if not config.lanes and (lanes < fewest or (lanes > fewest and lanes // 2 * vec >= columns)):
                continue                               # not coalesced, or half the lanes idle
            lanes = min(lanes, 32, threads)
            while lanes > 1 and shared_bytes(kind, "cl", threads, lanes, vec) > MAX_DYNAMIC_SHARED:
                lanes //= 2
            if lanes in tried:
                continue
            tried.add(lanes)
            shared = shared_bytes(kind, "cl", threads, lanes, vec)
            rows = threads // lanes
            tiles = -(-columns // (lanes * vec))
            if a == 0:
                return Launch((1, 1), (lanes, rows), shared)
            wave = max(1, fit(threads, shared) * sms)
            slots = max(1, round(config.waves * wave))
            useful = min(-(-a // rows), MAX_GRID_Y)
            for splits in sorted({1, slots // tiles, -(-slots // tiles), useful}):
                if not 1 <= splits <= useful or (splits > 1 and a * itemsize < MIN_SPLIT_BYTES * splits):
                    continue
                blocks = tiles * splits
                efficiency = blocks / (-(-blocks // slots) * slots)
                work = min(1.0, a / (rows * splits) / batch)
                score = efficiency * work
                if best is None or score > best[0] + 1e-9:
                    best = (score, Launch((tiles, splits), (lanes, rows), shared))
    assert best is not None
    return best[1]


# ---- the measured table -----------------------------------------------------------------------

def arch_key(compute_capability: str, sms: int) -> str:
    return f"sm_{compute_capability}/{sms}"


def shape_key(kind: str, layout: str, dtype_name: str, shape3: tuple[int, int, int]) -> str:
    return f"{kind}/{layout}/{dtype_name}/{'x'.join(map(str, shape3))}"


def check_config(config: LaunchConfig) -> None:
    """Raise ValueError unless ``config`` can be launched: threads a multiple of 32 up to the
    kernels' bound, lanes a power of two up to 32 (0: the heuristic's), waves above 0, vec a
    power of two (0: the widest), loads at least 1."""
    threads, lanes, waves, vec, loads = config
    if (threads % 32 or not 0 <= threads <= _kernels.MAX_THREADS or lanes & (lanes - 1) or not 0 <= lanes <= 32
            or not waves > 0 or vec & (vec - 1) or vec < 0 or loads < 1):
        raise ValueError(f"{config}: threads must be a multiple of 32 up to {_kernels.MAX_THREADS} (0: default), "
                         "lanes a power of two up to 32 (0: default), waves above 0, vec a power of two (0: the "
                         "widest), loads at least 1")


def check_table(table: Any, where: str = "tuning table") -> dict:
    """``table`` itself if it is a tuning table, ``{arch_key: {shape_key: config dict}}``: every
    shape key ``pass/layout/dtype/AxCxB`` of a known pass, layout and dtype, every configuration
    one :func:`check_config` accepts (fields LaunchConfig does not know are ignored: a newer
    table may have more).

    Raises:
        ValueError: naming ``where``, the first bad entry and what was expected.
    """
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{where}: expected {{arch: {{shape key: configuration}}}}, got {table!r:.200}")
    for arch, entries in table.items():
        for key, entry in entries.items():
            parts = key.split("/") if isinstance(key, str) else []
            dims = parts[3].split("x") if len(parts) == 4 else []
            if (len(parts) != 4 or parts[0] not in _kernels.PASSES or parts[1] not in _kernels.LAYOUTS
                    or parts[2] not in _kernels.CTYPES or len(dims) != 3 or not all(d.isdigit() for d in dims)):
                raise ValueError(f"{where}: {arch}: bad key {key!r}: expected pass/layout/dtype/AxCxB with a pass "
                                 f"of {_kernels.PASSES}, a layout of {_kernels.LAYOUTS}, a dtype of "
                                 f"{tuple(_kernels.CTYPES)}")
            known = {k: v for k, v in entry.items() if k in LaunchConfig._fields} if isinstance(entry, dict) else {}
            if not isinstance(entry, dict) or not all(
                    type(v) in ((int, float) if k == "waves" else (int,)) for k, v in known.items()):
                raise ValueError(f"{where}: {arch}: {key}: expected a configuration of numbers "
                                 f"({', '.join(LaunchConfig._fields)}), got {entry!r}")
            try:
                check_config(LaunchConfig(**known))
            except ValueError as exc:
                raise ValueError(f"{where}: {arch}: {key}: {exc}") from None
    return table


_tables: dict[str, dict] = {}


def load_table(path: str = TABLE_PATH) -> dict:
    """The table at ``path`` (``{arch_key: {shape_key: config dict}}``), read once; {} if absent.

    Raises:
        ValueError: the file is not a tuning table (see :func:`check_table`).
    """
    table = _tables.get(path)
    if table is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = "{}"
        try:
            table = check_table(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        _tables[path] = table
    return table


def lookup(arch: str, kind: str, layout: str, dtype_name: str, shape3: tuple[int, int, int],
           table: dict | None = None) -> LaunchConfig | None:
    """The measured configuration for this GPU and exact pass, or None (use the heuristic)."""
    entry = (load_table() if table is None else table).get(arch, {}).get(shape_key(kind, layout, dtype_name, shape3))
    if entry is None:
        return None
    return LaunchConfig(**{k: v for k, v in entry.items() if k in LaunchConfig._fields})


def save_table(table: dict, path: str) -> None:
    """Write ``table`` (atomically: temporary file, then rename) and forget the cached copy.

    Raises:
        ValueError: ``table`` is not a tuning table (see :func:`check_table`); nothing is written.
    """
    check_table(table, path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    _tables.pop(path, None)
