"""The host side of the GPU backend: launch plans, grid sizes, the tuning table, the sweep.

Runs ``CupyBackend``'s real planning code (through the emulated backend, tests/cuda_emu).
"""
import json
import re

import numpy as np
import pytest

import cuda_emu
import cusyncbn
from cusyncbn import _kernels, _sweep, _tuning
from cusyncbn._rules import shape3
from cusyncbn._tuning import LaunchConfig
from cusyncbn._bench_cases import DTYPES, LAYOUTS, SHAPES
from kernel_resources import occupancy
from layer_check import check_layer
from test_kernels_emulated import to_device, to_host

SMS = 132                                                  # an H100 / H200


def _x3(shape, layout):
    """(A, C, B) of a benchmark (N, C, H, W) shape in ``layout``."""
    n, c, h, w = shape
    return (n, c, h * w) if layout == "NCHW" else (n * h * w, c, 1)


def _launch(backend, kind, x3, dtype):
    """(plan, kernel layout, blocks, threads per block, one wave of blocks) of pass ``kind``."""
    plan = backend._make_plan(kind, x3, dtype, "" if kind == "dx" else "float32", 0)
    threads = plan.block[0] * plan.block[1]
    wave = SMS * _tuning.resident_blocks(backend.registers, threads, plan.shared + 64)
    return plan, plan.kernel.expr.split("<")[0][-2:], plan.grid[0] * plan.grid[1], threads, wave


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_benchmark_launch_fills_the_gpu(shape, dtype, layout):
    """Every pass of every benchmark case launches at least one full wave: blocks >= 132 SMs x
    the blocks an SM holds at the kernels' register cap (64 per thread, the least occupancy
    the launch bounds allow), or, where the input has fewer vectors than that many threads,
    every block has work. A full wave keeps every SM at its theoretical occupancy for the
    whole pass (the blocks grid-stride); more waves only add split partials to merge, so there
    are more only where no block is a split: every slab block a whole channel (C > one wave),
    every row-tile block all rows of its tile."""
    backend = cuda_emu.EmuBackend(sms=SMS)
    a, c, b = x3 = _x3(shape, layout)
    for kind in _kernels.PASSES:
        plan, kernels, blocks, threads, wave = _launch(backend, kind, x3, dtype)
        assert kernels == _tuning.layout_for(x3, dtype)
        assert plan.vec == 16 // _kernels.ITEMSIZE[dtype] or (b if kernels == "cs" else c * b) % plan.vec == 0
        vectors = a * c * b // plan.vec
        assert blocks >= 0.9 * wave or blocks * threads >= vectors, (kind, x3, plan.grid, plan.block, wave)
        splits = plan.grid[0] if kernels == "cs" else plan.grid[1]
        assert blocks <= 2 * wave or splits == 1, (kind, x3, plan.grid, wave)


MID_SIZE = [((64, 2048, 7, 7), "NCHW", dtype) for dtype in DTYPES] + \
    [((64, 1024, 14, 14), "NCHW", dtype) for dtype in DTYPES] + \
    [((64, 2048, 7, 7), "NHWC", dtype) for dtype in DTYPES] + [((64, 1024, 14, 14), "NHWC", "bfloat16")]


@pytest.mark.parametrize("shape,layout,dtype", MID_SIZE)
def test_mid_size_shapes_fill_the_gpu_with_16_byte_vectors(shape, layout, dtype):
    """The mid-size shapes of issue 19: (64, 2048, 7, 7) channel-second has H*W = 49 (odd), so its
    slabs loaded one element at a time on 2048 one-channel blocks; channel-last bfloat16 ran
    256 blocks where an SM holds 2 (under one wave). Now every pass loads 16 bytes per vector
    (row tiles: vectors cross from one channel's run of 49 into the next's), launches at least
    one full wave and several blocks per SM, gives each thread at least 2 vectors (a batch:
    4 loads in flight, 2 per array in dx), and ends on a last wave at least 70% full. The
    16-bit (64, 2048, 7, 7) channel-second input holds 1.48 waves of 4-vector threads whatever
    the block shape (64 x 100352 values / (132 SMs x 1024 threads x 4 x 8)): its last wave is
    74% of the grid's two."""
    backend = cuda_emu.EmuBackend(sms=SMS)
    a, c, b = x3 = _x3(shape, layout)
    for kind in _kernels.PASSES:
        plan, kernels, blocks, threads, wave = _launch(backend, kind, x3, dtype)
        assert plan.vec * _kernels.ITEMSIZE[dtype] == 16, (kind, plan.kernel.expr)
        assert blocks >= wave and blocks >= 2 * SMS, (kind, plan.grid, plan.block, wave)
        assert a * c * b // plan.vec >= 2 * blocks * threads, (kind, plan.grid, plan.block)
        assert blocks / (-(-blocks // wave) * wave) >= 0.7, (kind, plan.grid, plan.block, wave)
    if layout == "NCHW" and shape[2] == 7:
        assert kernels == "cl"                      # row tiles: the slabs' vectors would be 1 wide


def test_plans_are_cached_and_follow_alignment(use_backend):
    backend = use_backend(cuda_emu.EmuBackend(sms=8))
    made = []
    make = backend._make_plan
    backend._make_plan = lambda *a: made.append(a[:2]) or make(*a)
    bn = cusyncbn.SyncBatchNorm(8)
    x = to_device(np.random.default_rng(0).normal(size=(4, 8, 4, 4)), "float32")
    for _ in range(3):
        bn.backward(bn(x))
    assert [k for k, _ in made] == ["moments", "normalize", "backward", "dx"]       # once each
    bn(to_device(np.asarray(x), "float32", misalign=True))                         # a new alignment class
    assert [k for k, _ in made[4:]] == ["moments", "normalize"]
    assert {p.vec for p in backend._plans.values()} == {4, 1}


def test_table_lookup_override_and_fallback(tmp_path, use_backend):
    backend = use_backend(cuda_emu.EmuBackend(sms=8))
    key = _tuning.shape_key("moments", "cs", "float32", (4, 8, 256))
    backend.table = {"emu": {key: {"threads": 128, "waves": 2.0, "loads": 2, "future_field": 1}},
                     "sm_90/132": {key: {"threads": 512}}}
    assert backend.launch_config("moments", "cs", "float32", (4, 8, 256)) == LaunchConfig(threads=128, waves=2.0,
                                                                                          loads=2)
    assert backend.launch_config("moments", "cs", "float32", (4, 8, 255)) == _tuning.DEFAULT    # unknown shape
    assert backend.launch_config("normalize", "cs", "float32", (4, 8, 256)) == _tuning.DEFAULT  # other pass
    backend.set_launch_config("moments", "cs", LaunchConfig(threads=512))
    assert backend.launch_config("moments", "cs", "float32", (4, 8, 256)).threads == 512        # override first
    backend.set_launch_config("moments", "cs", None)
    bn = cusyncbn.SyncBatchNorm(8)
    bn(to_device(np.random.default_rng(0).normal(size=(4, 8, 16, 16)), "float32"))             # slabs
    plan = next(p for k, p in backend._plans.items() if k[0] == "moments")
    assert plan.block == (128, 1, 1) and "loads" not in str(plan)
    assert backend._kernels and all(k[2] == (2 if "moments" in k[1] else 4) for k in backend._kernels)
    with pytest.raises(ValueError, match="unknown pass"):
        backend.set_launch_config("finalize", "cs", LaunchConfig())
    for bad in (LaunchConfig(threads=1024), LaunchConfig(threads=100), LaunchConfig(lanes=12), LaunchConfig(loads=0)):
        with pytest.raises(ValueError, match="multiple of 32"):
            backend.set_launch_config("dx", "cl", bad)
    # the file format: written atomically, read back, unknown GPUs fall back
    path = str(tmp_path / "tuning.json")
    _tuning.save_table(backend.table, path)
    assert _tuning.lookup("emu", "moments", "cs", "float32", (4, 8, 256), _tuning.load_table(path)).threads == 128
    assert _tuning.lookup("sm_80/108", "moments", "cs", "float32", (4, 8, 256), _tuning.load_table(path)) is None
    assert _tuning.load_table(str(tmp_path / "missing.json")) == {}


KEY = "moments/cs/float32/64x256x3136"


@pytest.mark.parametrize("table, words", [
    ({"sm_90/132": {"finalize/cs/float32/4x8x16": {}}}, "bad key 'finalize/cs/float32/4x8x16'"),
    ({"sm_90/132": {"moments/nc/float32/4x8x16": {}}}, "bad key"),
    ({"sm_90/132": {"moments/cs/int8/4x8x16": {}}}, "bad key"),
    ({"sm_90/132": {"moments/cs/float32/4x8": {}}}, "bad key"),
    ({"sm_90/132": {KEY: {"threads": 100}}}, "threads must be a multiple of 32"),
    ({"sm_90/132": {KEY: {"threads": 1024}}}, "threads must be a multiple of 32 up to 512"),
    ({"sm_90/132": {KEY: {"lanes": 12}}}, "lanes a power of two"),
    ({"sm_90/132": {KEY: {"loads": 0}}}, "loads at least 1"),
    ({"sm_90/132": {KEY: {"waves": 0.0}}}, "waves above 0"),
    ({"sm_90/132": {KEY: {"threads": "256"}}}, "expected a configuration of numbers"),
    ({"sm_90/132": {KEY: [256]}}, "expected a configuration of numbers"),
    ({"sm_90/132": [KEY]}, "expected {arch: {shape key: configuration}}"),
])
def test_a_bad_tuning_table_is_refused_when_read_and_when_written(tmp_path, table, words):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=re.escape(words)):
        _tuning.load_table(str(path))
    with pytest.raises(ValueError, match=re.escape(words)):
        _tuning.save_table(table, str(tmp_path / "written.json"))
    assert not (tmp_path / "written.json").exists()


def test_good_tuning_tables_round_trip_and_the_shipped_one_is_good(tmp_path):
    table = {"sm_90/132": {KEY: {"threads": 256, "lanes": 0, "waves": 2.0, "vec": 4, "loads": 2},
                           "dx/cl/bfloat16/200704x256x1": {"threads": 512, "lanes": 16, "waves": 1, "vec": 0,
                                                           "loads": 4, "future_field": 1}},
             "sm_80/108": {}}
    path = str(tmp_path / "tuning.json")
    _tuning.save_table(table, path)
    assert _tuning.load_table(path) == table
    assert _tuning.lookup("sm_90/132", "dx", "cl", "bfloat16", (200704, 256, 1), _tuning.load_table(path)) == \
        LaunchConfig(threads=512, lanes=16, waves=1, vec=0, loads=4)
    (tmp_path / "broken.json").write_text('{"sm_90/132": {')
    with pytest.raises(ValueError, match="broken.json: not JSON"):
        _tuning.load_table(str(tmp_path / "broken.json"))
    with open(_tuning.TABLE_PATH, encoding="utf-8") as f:
        shipped = json.load(f)
    assert _tuning.check_table(shipped, _tuning.TABLE_PATH) is shipped


def test_occupancy_calculation():
    assert _tuning.resident_blocks(64, 256, 2000) == 4          # 64 registers: 50%
    assert occupancy(64, 512, 17000) == 0.5
    assert occupancy(76, 256, 2000) == 0.375            # the old moments_cs<float, float, 4>
    assert occupancy(110, 512, 9000) == 0.25            # the old moments_cl<bf16_t, float, 8>
    assert occupancy(32, 256, 0) == 1.0


@pytest.mark.parametrize("data_format,shape", [("NCHW", (6, 5, 16, 16)), ("NCHW", (6, 4, 7, 7)),
                                               ("NHWC", (5, 7, 3, 24)), ("NC", (70, 9))])
def test_every_sweep_configuration_is_correct(use_backend, data_format, shape):
    """Every configuration of the sweep grid, applied to all four passes at once, gives a
    correct layer (checked against the float64 reference, as the sweep checks before timing);
    channel-second input with long rows runs slabs, with short ones row tiles."""
    backend = use_backend(cuda_emu.EmuBackend(sms=132))
    c = shape[-1] if data_format != "NCHW" else shape[1]
    layout = _tuning.layout_for(shape3(shape, c, data_format != "NCHW"), "float32")
    assert layout == ("cs" if shape == (6, 5, 16, 16) else "cl")
    grid = _sweep.sweep_grid(layout)
    assert len(set(grid)) == len(grid) >= 16
    for config in grid:
        for kind in _kernels.PASSES:
            backend.set_launch_config(kind, layout, config)
        check_layer(data_format, shape, "float16", to_device, to_host, device="cpu")
        check_layer(data_format, shape, "float32", to_device, to_host, device="cpu")
    used = {(k[1], k[2]) for k in backend._kernels}
    assert {loads for _, loads in used} == {2, 4}


def test_sweep_writes_the_fastest_correct_configuration(monkeypatch, use_backend):
    """sweep_case on the emulator with a stand-in timer: a wrong configuration is skipped
    (never timed), the fastest correct one is kept per pass under the layer's (A, C, B)."""
    backend = use_backend(cuda_emu.EmuBackend(sms=132))
    grid = [LaunchConfig(threads=256), LaunchConfig(threads=128), LaunchConfig(threads=512)]
    cost = {256: 3.0, 128: 1.0, 512: 2.0}
    timed = []

    def timer(fn):
        config = next(iter(backend._overrides.values()))
        timed.append(config.threads)
        fn()
        return cost[config.threads]

    real_error = _sweep.layer_error
    monkeypatch.setattr(_sweep, "layer_error", lambda bn, *a: 99.0 if backend._overrides[next(iter(
        backend._overrides))].threads == 128 else real_error(bn, *a))

    def make(shape, dtype, seed):
        return to_device(np.random.default_rng(seed).normal(3, 2, size=shape), dtype)

    lines = []
    best = _sweep.sweep_case(backend, (4, 6, 5, 5), "float32", "NCHW", make, to_host, timer, grid=grid,
                             log=lines.append)
    layout = _tuning.layout_for((4, 6, 25), "float32")                         # short rows: row tiles
    assert set(best) == {_tuning.shape_key(k, layout, "float32", (4, 6, 25)) for k in _kernels.PASSES}
    assert all(entry["threads"] == 512 for entry in best.values())                 # 128 was wrong
    assert 128 not in timed and sum("WRONG" in line for line in lines) == 4
    assert backend._overrides == {}
