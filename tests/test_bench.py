"""The benchmark's report and its targets, fed synthetic results (the timing itself needs a
GPU: see .ci/gpu)."""
import math
import os
import re
import sys

import pytest

from cusyncbn import bench

BIG, SMALL = (64, 256, 56, 56), (2, 512, 32, 32)      # 196 MiB in float32; 4 MiB in float32
MIB = 1 << 20
L2 = 60 * MIB


def nbytes(shape, dtype):
    numel = 1
    for n in shape:
        numel *= n
    return numel * (4 if dtype == "float32" else 2)


def row(shape, dtype, name, fwd_ms, bwd_ms, ok=True, bw=3e12):
    """A timing of ``name`` as main() records it: the fused forms have no floor fractions."""
    if name in (bench.OURS_RELU, bench.CUDNN_RELU, bench.OURS_ADD_RELU, bench.CUDNN_ADD_RELU):
        fractions = (math.nan,) * 4
    else:
        fractions = bench.floor_fractions(nbytes(shape, dtype), fwd_ms, bwd_ms, bw, L2)
    return bench.Row(shape, dtype, "NCHW", name, fwd_ms, fractions[0], bwd_ms, fractions[1], 1e-6, ok, *fractions[2:])


def floor_ms(shape, dtype, passes, fraction, bw=3e12):
    """The time at which ``passes`` * numel * itemsize bytes run at ``fraction`` of the floor."""
    return passes * nbytes(shape, dtype) / (fraction * bw) * 1e3


def columns(rows):
    """{(shape, dtype): {header: cell}} of the summary of ``rows``."""
    lines = bench.summary(rows)
    assert lines[0].startswith("| shape |") and lines[1].startswith("|---")
    head = [h.strip() for h in lines[0].split("|")[1:-1]]
    table = {}
    for line in lines[2:]:
        cells = dict(zip(head, (c.strip() for c in line.split("|")[1:-1]), strict=True))
        table[(cells["shape"], cells["dtype"])] = cells
    return table


def targets(rows):
    """{(shape, dtype): the targets column} of the summary of ``rows``."""
    return {key: cells["targets"] for key, cells in columns(rows).items()}


def fused_at(shape, dtype, ratio, ours_ms=1.0):
    """Both fused forms, cusyncbn's ``ratio`` times as fast as cuDNN followed by the separate ops."""
    return [row(shape, dtype, ours, ours_ms, ours_ms) for ours in (bench.OURS_RELU, bench.OURS_ADD_RELU)] + \
        [row(shape, dtype, theirs, ratio * ours_ms, ratio * ours_ms) for theirs in (bench.CUDNN_RELU,
                                                                                     bench.CUDNN_ADD_RELU)]


@pytest.mark.parametrize("mib,fwd,bwd", [
    (10, 20, 30),            # x (and x, dy) within L2: the second read is free, 2N / 3N
    (30, 60, 90),            # x and dy exactly fill L2: still 3N
    (40, 80, 140),           # x within L2, x and dy (80 MiB) not: 5N - L2
    (60, 120, 240),          # x exactly fills L2
    (100, 240, 440),         # neither: the last 60 MiB of the first read come from L2
])
def test_l2_aware_floor_by_hand(mib, fwd, bwd):
    assert bench.floor_bytes(mib * MIB, "forward", L2) == fwd * MIB
    assert bench.floor_bytes(mib * MIB, "backward", L2) == bwd * MIB
    # without L2 (the default): the benchmark's first floor, 3N / 5N, whatever the size
    assert bench.floor_bytes(mib * MIB, "forward") == 3 * mib * MIB
    assert bench.floor_bytes(mib * MIB, "backward") == 5 * mib * MIB


def test_floor_names_its_pass():
    with pytest.raises(ValueError, match="which must be 'forward' or 'backward', got 'both'"):
        bench.floor_bytes(MIB, "both", L2)


def test_fractions_of_both_floors():
    n = 10 * MIB                                           # within L2: the L2-aware floor is 2N / 3N
    at_l2_floor = (2 * n / 3e12 * 1e3, 3 * n / 3e12 * 1e3)  # ms at 3 TB/s
    fractions = bench.floor_fractions(n, *at_l2_floor, 3e12, L2)
    assert fractions == pytest.approx((3 / 2, 5 / 3, 1.0, 1.0))   # beyond 100% of today's floor
    assert bench.floor_fractions(n, *at_l2_floor, 3e12, 0) == pytest.approx((3 / 2, 5 / 3) * 2)
    big = 600 * MIB                                        # L2 saves 60 of 1800 MiB forward, 60 of 3000 backward
    fractions = bench.floor_fractions(big, 1.0, 1.0, 3e12, L2)
    assert fractions[2] / fractions[0] == pytest.approx(1740 / 1800)
    assert fractions[3] / fractions[1] == pytest.approx(2940 / 3000)


def test_l2_size_comes_from_the_device(monkeypatch):
    cupy = pytest.importorskip("cupy")
    asked = []
    monkeypatch.setattr(cupy.cuda, "Device", lambda: type("Device", (), {"id": 3})())
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceProperties",
                        lambda dev: asked.append(dev) or {"l2CacheSize": 50 * MIB})
    assert bench.l2_bytes() == 50 * MIB and asked == [3]

    def no_device(dev):
        raise cupy.cuda.runtime.CUDARuntimeError(100)       # cudaErrorNoDevice
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceProperties", no_device)
    assert bench.l2_bytes() == bench.L2_FALLBACK_BYTES == 60 * MIB


def test_l2_size_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)          # import cupy raises ImportError
    assert bench.l2_bytes() == bench.L2_FALLBACK_BYTES


def test_summary_states_speedups_and_misses(tmp_path, capsys):
    rows = [row(BIG, "float32", bench.OURS, 0.30, 0.35), row(BIG, "float32", bench.CUDNN, 0.25, 0.45),
            row(BIG, "float32", bench.TORCH_SYNC, 0.70, 0.55)] + fused_at(BIG, "float32", 1.3) + [
            row(SMALL, "float16", bench.OURS, 0.02, 0.02), row(SMALL, "float16", bench.TORCH_SYNC, 0.30, 0.20),
            row(SMALL, "float16", bench.CUDNN, 0.03, 0.02),
            row(SMALL, "bfloat16", bench.OURS, 0.02, 0.02, ok=False)]
    lines = bench.summary(rows)
    assert len(lines) == 2 + 3
    first = columns(rows)[(str(BIG), "float32")]
    assert first["fwd % floor"] == f"{rows[0].fwd_floor:.0%}" and first["bwd % floor"] == f"{rows[0].bwd_floor:.0%}"
    assert first["fwd % L2-aware floor"] == f"{rows[0].fwd_l2_floor:.0%}"
    assert first["bwd % L2-aware floor"] == f"{rows[0].bwd_l2_floor:.0%}"
    assert rows[0].fwd_l2_floor < rows[0].fwd_floor                   # 196 MiB: L2 saves 60 MiB of 588
    assert float(first["x vs torch SyncBN"]) == round((0.70 + 0.55) / (0.30 + 0.35), 1)   # 1.9
    assert float(first["x vs cuDNN"]) == round((0.25 + 0.45) / (0.30 + 0.35), 2)          # 1.08
    assert first["BN+ReLU x vs cuDNN, relu"] == first["BN+add+ReLU x vs cuDNN, + z, relu"] == "1.30"
    assert first["targets"] == "< 85% floor, < 2x sync"                 # fwd at 68.5% of the floor
    assert lines[3].strip().endswith("| met |")                           # small: no floor or fused target
    assert "| nan | nan |" in lines[3]                                    # not run: shown as such
    assert "WRONG" in lines[4] and "< 2x sync" in lines[4] and "slower than cuDNN" in lines[4]   # none ran: missed
    bench._write(str(tmp_path), "Test card", 3e12, rows, 12.5, 18.6, l2=L2)
    text = (tmp_path / "results.md").read_text()
    assert "Test card" in text and text.count("| cusyncbn |") == 3 and bench.TARGETS in text
    assert "L2 60 MiB (the L2-aware floor's)" in text
    assert "cusyncbn 12.5 us" in text and "batch_norm 18.6 us" in text and "ratio 0.67 (met" in text
    fused = [line for line in text.splitlines() if f"| {bench.OURS_RELU} |" in line]
    assert len(fused) == 1 and fused[0].split(" | ").count("-") == 4             # no floor for the fused forms
    out = capsys.readouterr().out
    assert "ratio 0.67 (met" in out and lines[2] in out


@pytest.mark.parametrize("shape,dtype,large", [(BIG, "float32", True), (BIG, "bfloat16", True),
                                               ((4, 256, 128, 128), "float32", True),     # exactly 64 MiB
                                               ((4, 256, 128, 128), "float16", False),    # 32 MiB
                                               (SMALL, "float32", False)])
def test_floor_target_only_on_large_inputs(shape, dtype, large):
    fast = [row(shape, dtype, bench.CUDNN, 10.0, 10.0), row(shape, dtype, bench.TORCH_SYNC, 10.0, 10.0)] + \
        fused_at(shape, dtype, 1.3)
    at = {f: row(shape, dtype, bench.OURS, floor_ms(shape, dtype, 3, f), floor_ms(shape, dtype, 5, f))
          for f in (0.84, 0.86)}
    assert targets([at[0.86]] + fast) == {(str(shape), dtype): "met"}
    assert targets([at[0.84]] + fast) == {(str(shape), dtype): "< 85% floor" if large else "met"}
    slow_bwd = row(shape, dtype, bench.OURS, floor_ms(shape, dtype, 3, 0.9), floor_ms(shape, dtype, 5, 0.8))
    assert targets([slow_bwd] + fast) == {(str(shape), dtype): "< 85% floor" if large else "met"}


def test_the_floor_target_is_on_todays_floor_not_the_l2_aware_one():
    """A large pass at 86% of 3N / 5N is at less of the lower L2-aware floor: still met."""
    ours = row(BIG, "float32", bench.OURS, floor_ms(BIG, "float32", 3, 0.86), floor_ms(BIG, "float32", 5, 0.86))
    assert ours.fwd_l2_floor < 0.85 and ours.bwd_l2_floor < 0.86
    fast = [row(BIG, "float32", bench.CUDNN, 10.0, 10.0), row(BIG, "float32", bench.TORCH_SYNC, 10.0, 10.0)]
    assert targets([ours] + fast + fused_at(BIG, "float32", 1.3)) == {(str(BIG), "float32"): "met"}


@pytest.mark.parametrize("cudnn_ms,sync_ms,want", [
    (1.00, 2.00, "met"),                                   # exactly 1x cuDNN and 2x the sync path
    (0.99, 2.00, "slower than cuDNN"),
    (1.00, 1.99, "< 2x sync"),
    (0.50, 1.00, "slower than cuDNN, < 2x sync"),
    (None, 2.00, "slower than cuDNN"),                     # no cuDNN run: not shown as met
])
def test_speedup_targets_on_every_shape(cudnn_ms, sync_ms, want):
    ours = floor_ms(SMALL, "float32", 3, 0.5)             # small: the floor does not count
    rows = [row(SMALL, "float32", bench.OURS, ours, ours), row(SMALL, "float32", bench.TORCH_SYNC,
                                                               sync_ms * ours, sync_ms * ours)]
    if cudnn_ms is not None:
        rows.append(row(SMALL, "float32", bench.CUDNN, cudnn_ms * ours, cudnn_ms * ours))
    assert targets(rows) == {(str(SMALL), "float32"): want}


def plain_met(shape, dtype):
    """cusyncbn's plain batch norm meeting every target of its own on ``shape``."""
    ours = row(shape, dtype, bench.OURS, floor_ms(shape, dtype, 3, 0.9), floor_ms(shape, dtype, 5, 0.9))
    return [ours, row(shape, dtype, bench.CUDNN, ours.fwd_ms, ours.bwd_ms),
            row(shape, dtype, bench.TORCH_SYNC, 2 * ours.fwd_ms, 2 * ours.bwd_ms)]


@pytest.mark.parametrize("relu,add,want", [
    (1.30, 1.30, "met"),                                   # exactly the target, both forms
    (1.29, 1.30, "BN+ReLU < 1.3x"),
    (1.30, 1.29, "BN+add+ReLU < 1.3x"),
    (1.00, 0.50, "BN+ReLU < 1.3x, BN+add+ReLU < 1.3x"),
    (None, 1.30, "BN+ReLU < 1.3x"),                        # ours or cuDNN's not run: not shown as met
])
def test_fused_target_on_large_shapes(relu, add, want):
    fused = []
    for (ours, theirs, _), ratio in zip(bench.FUSED, (relu, add)):
        if ratio is not None:
            fused += [row(BIG, "float32", ours, 1.0, 1.0), row(BIG, "float32", theirs, ratio, ratio)]
    table = columns(plain_met(BIG, "float32") + fused)[(str(BIG), "float32")]
    assert table["targets"] == want
    assert table["BN+ReLU x vs cuDNN, relu"] == ("nan" if relu is None else f"{relu:.2f}")
    # below 64 MiB the same numbers are shown but not graded
    small = columns(plain_met(SMALL, "float32") + [r._replace(shape=SMALL) for r in fused])[(str(SMALL), "float32")]
    assert small["targets"] == "met"
    assert small["BN+add+ReLU x vs cuDNN, + z, relu"] == f"{add:.2f}"


def test_a_wrong_fused_result_is_named():
    rows = plain_met(SMALL, "float32") + [r._replace(ok=False) if r.name == bench.OURS_ADD_RELU else r
                                          for r in fused_at(SMALL, "float32", 1.3)]
    assert targets(rows) == {(str(SMALL), "float32"): "WRONG BN+add+ReLU"}
    wrong_theirs = plain_met(SMALL, "float32") + [r._replace(ok=False) if r.name == bench.CUDNN_RELU else r
                                                  for r in fused_at(SMALL, "float32", 1.3)]
    assert targets(wrong_theirs) == {(str(SMALL), "float32"): "met"}   # the comparator's own error is its row's


def test_h200_results_in_the_docs_are_graded_as_the_summary_grades_them():
    """docs/PERFORMANCE.md grades the H200 run of 2026-11-26 against today's targets: the
    summary, fed the printed numbers, must agree row by row. That run had no fused forms (nor
    their target): they are given at the target, so that the other targets are what is compared."""
    doc = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                            "PERFORMANCE.md")).read()
    printed = re.findall(r"^\| (\([\d, ]+\)) \| (\w+) \| (NCHW|NHWC) \| (\d+)% \| (\d+)% \| ([\d.]+) \| "
                         r"([\d.]+) \| [^|]+ \| ([^|]+) \|$", doc, re.M)
    assert len(printed) == 36
    for shape, dtype, layout, ff, bf, vs_sync, vs_cudnn, graded in printed:
        shape = tuple(int(n) for n in shape.strip("()").split(", "))
        ours = row(shape, dtype, bench.OURS, floor_ms(shape, dtype, 3, int(ff) / 100),
                   floor_ms(shape, dtype, 5, int(bf) / 100))
        half = (ours.fwd_ms + ours.bwd_ms) / 2
        rows = [ours, row(shape, dtype, bench.TORCH_SYNC, half * float(vs_sync), half * float(vs_sync)),
                row(shape, dtype, bench.CUDNN, half * float(vs_cudnn), half * float(vs_cudnn))]
        assert targets(rows + fused_at(shape, dtype, bench.FUSED_TARGET)) == {(str(shape), dtype): graded.strip()}, \
            (shape, dtype, layout)


def test_check_leaves_the_relu_kink_out_of_the_gradients():
    torch = pytest.importorskip("torch")
    pre = torch.tensor([0.0005, -0.5, 0.5], dtype=torch.float64)   # the first within float32's 1e-3 of 0
    want = (torch.relu(pre), torch.zeros(3, dtype=torch.float64))
    y = torch.relu(pre).float()                            # right, to float32's rounding
    kink_dx = torch.tensor([1.0, 0.0, 0.0])                # dx off by 1 at the kink only
    err, ok = bench.check([y, kink_dx], want, "float32", pre=pre)
    assert ok and err < 1e-7
    assert bench.check([y, kink_dx], want, "float32") == (1.0, False)        # plain batch norm: everywhere
    assert bench.check([y, torch.tensor([0.0, 1.0, 0.0])], want, "float32", pre=pre) == (1.0, False)
    assert not bench.check([y, kink_dx], want, "float32", pre=pre * 10)[1]   # 0.005: outside float32's band
    wrong_y = y.clone()
    wrong_y[0] = 0.1
    assert not bench.check([wrong_y, kink_dx], want, "float32", pre=pre)[1]  # y: compared everywhere


def cpu_inputs(shape, layout, seed=0):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    x, dy, z = torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if layout == "NHWC":
        x, dy, z = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy, z))
    return x, dy, z, torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_the_check_before_timing_on_the_cpu(layout):
    """The benchmark's implementations, made on CPU tensors (cusyncbn on NumPy, PyTorch's CPU
    batch norm in place of cuDNN), pass the check against the float64 reference in every form;
    the plain forms do not pass the fused forms' check."""
    import cusyncbn
    shape = (3, 4, 5, 6)
    x, dy, z, w, b = cpu_inputs(shape, layout)
    impls = bench._impls(shape, layout, None, comm=cusyncbn.SingleProcessComm())
    results = {}
    for name in (bench.OURS, bench.CUDNN, bench.OURS_RELU, bench.CUDNN_RELU, bench.OURS_ADD_RELU,
                 bench.CUDNN_ADD_RELU):
        form, make = impls[name]
        fwd, bwd, results[name] = make(x, dy, w, b, z)
        want, pre = bench._expected(x, dy, w, b, z, form)
        assert (pre is None) == (form == bench.BN)
        assert len(results[name]) == len(want) == (3 if form == bench.ADD_RELU else 2)
        err, ok = bench.check(results[name], want, "float32", pre=pre)
        assert ok and err < 1e-5, (name, err)
        assert results[name][0].shape == shape and results[name][0].is_contiguous(
            memory_format=bench_format(layout))
        fwd()                                              # the timed calls run again
        bwd()
    relu, pre = bench._expected(x, dy, w, b, z, bench.RELU)
    assert not bench.check(results[bench.CUDNN], relu, "float32", pre=pre)[1]    # no ReLU: y < 0 left
    add_relu, pre = bench._expected(x, dy, w, b, z, bench.ADD_RELU)
    no_residual = results[bench.OURS_RELU] + (results[bench.OURS_RELU][1],)
    assert not bench.check(no_residual, add_relu, "float32", pre=pre)[1]


def bench_format(layout):
    import torch
    return torch.channels_last if layout == "NHWC" else torch.contiguous_format


@pytest.mark.parametrize("ours,theirs,ratio,verdict", [(63.0, 18.6, "3.39", "missed"), (18.6, 18.6, "1.00", "met"),
                                                        (12.0, 18.6, "0.65", "met")])
def test_host_time_target_is_a_ratio_to_torch(ours, theirs, ratio, verdict):
    line = bench.host_summary(ours, theirs)
    assert f"cusyncbn {ours:.1f} us" in line and f"batch_norm {theirs:.1f} us" in line
    assert f"ratio {ratio} ({verdict}: target <= 1.0)" in line


@pytest.mark.parametrize("argv", [[], ["--profile", "--quick"]])
def test_without_a_gpu_it_says_so(argv, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark would run")
    assert bench.main(argv) == 2
    assert "needs" in capsys.readouterr().err


def test_measured_host_time_is_printed_beside_the_prediction():
    line = bench.predicted_line(90.0)
    assert line.startswith("host time per call: measured 90.0 us, predicted ")
    assert "ledger per training pass: launches 2," in line and "measured/predicted" in line


def test_host_targets_on_synthetic_numbers():
    lines = bench.host_targets({"call": 20.0, "F.batch_norm": 25.0, "eval": 15.0, "module": 60.0,
                                "nn.BatchNorm2d": 40.0}).splitlines()
    assert "ratio 0.80 (met: target <= 1.0)" in lines[0]
    assert lines[1] == ("Host time, eval forward: 15.0 us, torch.nn.functional.batch_norm 25.0 us: ratio 0.60 "
                        "(missed: target <= 0.5)")
    assert lines[2] == ("Host time, cusyncbn.torch module call: 60.0 us, torch.nn.BatchNorm2d 40.0 us: ratio 1.50 "
                        "(missed: target <= 1.3)")
    met = bench.host_targets({"call": 20.0, "F.batch_norm": 25.0, "eval": 12.5, "module": 52.0,
                              "nn.BatchNorm2d": 40.0})
    assert "ratio 0.50 (met: target <= 0.5)" in met and "ratio 1.30 (met: target <= 1.3)" in met
