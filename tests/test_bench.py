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


# --- The DRAM table: Nsight Compute's raw CSV (ncu --csv --page raw) of a --profile --quick run ---

NCU_COLUMNS = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
               "Grid Size", "Device", "CC", "dram__bytes_read.sum", "dram__bytes_write.sum", "launch__grid_size"]
TEMPLATE = {"float32": "float", "float16": "half_t", "bfloat16": "bf16_t"}
PER_N = {"moments": (1.0, 0.0), "normalize": (0.05, 0.4), "backward": (2.0, 0.0), "dx": (0.1, 0.5)}


def quoted(cells):
    return ",".join(f'"{c}"' for c in cells)


def thousands(value):
    return f"{round(value):,}"                              # "25,690,112", as ncu prints a count


def ncu_kernels(shapes=bench.QUICK_SHAPES, per_n=None):
    """[(kernel name, bytes read, bytes written)] of a --profile run on ``shapes``, as cusyncbn's
    kernels would be named; ``per_n(config, family)`` gives (read, write) in units of N, by
    default a pass whose second read comes from L2 and whose output the L2 partly holds at the
    end: forward 1.05N read (x once, the partial sums), 0.4N written."""
    kernels = []
    for config in bench.configurations(shapes):
        shape, dtype, layout = config
        n = nbytes(shape, dtype)
        suffix = "cs" if layout == "NCHW" else "cl"
        for family in ("moments", "normalize", "backward", "dx"):
            read, write = per_n(config, family) if per_n else PER_N[family]
            args = f"{TEMPLATE[dtype]}, 4" if family in ("moments", "dx") else f"{TEMPLATE[dtype]}, float, 4"
            kernels.append((f"{family}_{suffix}<{args}>", read * n, write * n))
    return kernels


def ncu_csv(kernels, passes=1, others=True):
    """The text ncu writes with --csv --page raw --log-file: its ==PROF== lines (one per profiled
    kernel with its replay passes), the header, the units row and one row per kernel, numbers with
    thousands separators. With ``others``, a cuDNN kernel and an NCCL all-reduce among them (a
    profile whose filter let them in), and the benchmark's own output lines (a redirected stdout)."""
    rows, prof = [], ["==PROF== Connected to process 4242 (/usr/bin/python3.12)"]
    theirs = [("void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 128, 1, 2, 0>(float, float, ...)", 1e6, 1e6),
              ("ncclDevKernel_AllReduce_Sum_f64_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 0.0, 0.0)]
    for i, (name, read, write) in enumerate(kernels + (theirs if others else [])):
        base = name.removeprefix("void ").split("<")[0].split("(")[0].rsplit("::", 1)[-1]
        prof.append(f'==PROF== Profiling "{base}" - {i}: 0%....50%....100% - {passes} pass{"es" * (passes > 1)}')
        rows.append(quoted([i, 4242, "python3.12", "127.0.0.1", name, 1, 7, "(256, 1, 1)", "(2, 256, 1)", 0, "9.0",
                            thousands(read), thousands(write), "512"]))
    if others:
        prof.insert(1, "profiled: cusyncbn (64, 256, 56, 56) float32 NCHW")
    prof.append("==PROF== Disconnected from process 4242")
    units = quoted([""] * 11 + ["byte", "byte", ""])
    return "\n".join(prof + [quoted(NCU_COLUMNS), units] + rows) + "\n"


def dram(text, shapes=bench.QUICK_SHAPES):
    """{(shape, dtype, layout): {header: cell}} of the per-configuration DRAM table, and its last line."""
    lines = bench.dram_table(bench._ncu.read_raw(text), shapes, L2)
    start = next(i for i, line in enumerate(lines) if line.startswith("| shape | dtype | layout | N MiB |"))
    head = [h.strip() for h in lines[start].split("|")[1:-1]]
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(head, (c.strip() for c in line.split("|")[1:-1]), strict=True))
        table[(cells["shape"], cells["dtype"], cells["layout"])] = cells
    return table, lines[-1]


GRADE = "forward <= 2.3N (below 40 MiB)"
SMALL_CONFIG = (str((2, 512, 32, 32)), "float32", "NCHW")      # 4 MiB: graded
MID_CONFIG = (str((64, 2048, 7, 7)), "bfloat16", "NHWC")       # 12.25 MiB: graded
BIG_CONFIG = (str((64, 256, 56, 56)), "float16", "NCHW")       # 98 MiB: shown, not graded


def test_dram_table_per_pass_against_both_floors():
    table, target = dram(ncu_csv(ncu_kernels()))
    assert len(table) == 18                                   # 3 quick shapes x 3 dtypes x 2 layouts, in order
    assert list(table)[:2] == [(str(bench.QUICK_SHAPES[0]), "float32", "NCHW"),
                               (str(bench.QUICK_SHAPES[0]), "float32", "NHWC")]
    small = table[SMALL_CONFIG]
    assert small["N MiB"] == "4.0"
    assert (small["fwd read"], small["fwd write"], small["fwd DRAM"]) == ("1.05N", "0.40N", "2.05N")  # write: >= N
    assert small["fwd floor: 3N, L2-aware"] == "3.00N, 2.00N"          # 4 MiB within 60 MiB of L2
    assert (small["bwd read"], small["bwd write"], small["bwd DRAM"]) == ("2.10N", "0.50N", "3.10N")
    assert small["bwd floor: 5N, L2-aware"] == "5.00N, 3.00N"
    assert small[GRADE] == "met" and table[MID_CONFIG][GRADE] == "met"
    big = table[BIG_CONFIG]                                   # 98 MiB: L2 holds 60 of the 196 MiB first read
    assert big["fwd floor: 3N, L2-aware"] == f"3.00N, {(3 * 98 - 60) / 98:.2f}N" and big[GRADE] == "-"
    assert target == ("Target: inputs below 40 MiB: forward DRAM bytes <= 2.3N: met on 12 of 12; one replay pass "
                      "for each of the 72 kernels ncu named")


def forward_at(config, read, write):
    """ncu_kernels in which the forward of ``config`` reads ``read`` N and writes ``write`` N."""
    at = (tuple(int(n) for n in config[0].strip("()").split(", ")), *config[1:])

    def per_n(c, family):
        if c == at and family in ("moments", "normalize"):
            return (read, write) if family == "moments" else (0.0, 0.0)
        return PER_N[family]
    return ncu_kernels(per_n=per_n)


@pytest.mark.parametrize("config", [SMALL_CONFIG, MID_CONFIG])
@pytest.mark.parametrize("read,write,dram_n,met", [
    (2.0, 1.0, "3.00N", False),        # x read twice from DRAM, y written: today's floor, the negative control
    (2.0, 0.0, "3.00N", False),        # the same with y still in L2 at the end: y counts N all the same
    (1.31, 0.0, "2.31N", False),
    (1.3, 0.0, "2.30N", True),         # exactly the target
    (1.0, 1.2, "2.20N", True),         # more written than N counts as written
])
def test_dram_target_graded_on_inputs_below_40_mib(config, read, write, dram_n, met):
    table, target = dram(ncu_csv(forward_at(config, read, write)))
    assert table[config]["fwd DRAM"] == dram_n
    assert table[config][GRADE] == ("met" if met else "> 2.3N")
    if met:
        assert "met on 12 of 12;" in target
    else:
        assert f"met on 11 of 12 (missed: {config[0]} {config[1]} {config[2]} {dram_n});" in target


def test_dram_target_leaves_large_inputs_ungraded():
    table, target = dram(ncu_csv(forward_at(BIG_CONFIG, 2.0, 1.0)))
    assert table[BIG_CONFIG]["fwd DRAM"] == "3.00N" and table[BIG_CONFIG][GRADE] == "-"
    assert "met on 12 of 12;" in target


def test_dram_table_refuses_a_profile_of_other_configurations():
    kernels = ncu_kernels()
    with pytest.raises(ValueError, match=r"^71 cusyncbn kernels in the profile \(moments 18, normalize 18, "
                                         r"backward 18, dx 17\), but 72 expected: 4 \(moments, normalize, backward, "
                                         r"dx\) for each of the 18 configurations of 3 shapes"):
        dram(ncu_csv(kernels[:-1]))
    with pytest.raises(ValueError, match=r"^72 cusyncbn kernels .* but 144 expected: .* 36 configurations of 6 shapes "
                                         r"\(was the profile run with --quick"):
        dram(ncu_csv(kernels), shapes=bench.SHAPES)
    swapped = kernels[:4] + [kernels[5], kernels[4]] + kernels[6:]        # the second configuration's forward
    with pytest.raises(ValueError, match=r"^cusyncbn kernel 4 of the profile \(ncu ID 4\) is 'normalize_cl<float, "
                                         r"float, 4>', where a moments_ kernel was expected \(configuration 1: "
                                         r"\(64, 256, 56, 56\) float32 NHWC\)"):
        dram(ncu_csv(swapped))


def test_dram_table_is_not_graded_after_several_replay_passes():
    """With several replay passes ncu restores memory between them: the L2 is not the run's."""
    table, target = dram(ncu_csv(ncu_kernels(), passes=7))
    assert table[SMALL_CONFIG][GRADE] == "not graded" and table[BIG_CONFIG][GRADE] == "-"
    assert target.startswith("Target: inputs below 40 MiB: forward DRAM bytes <= 2.3N: not graded: ncu replayed 72 "
                             "of cusyncbn's kernels more than once (e.g. 'moments_cs')")
    unnamed = "\n".join(line for line in ncu_csv(ncu_kernels()).splitlines() if "Profiling" not in line)
    assert dram(unnamed)[1].endswith("met on 12 of 12; ncu named no replay passes in the file: check that each "
                                     "kernel took one")


def test_raw_csv_units_separators_and_kernel_names():
    """ncu's scaled units (Mbyte: decimal), separators, quoted cells, the forms of a kernel name."""
    text = ncu_csv([("void dx_cl<__nv_bfloat16, 8>(const __nv_bfloat16 *, int)", 1.5e6, 2.5e6)], others=False)
    text = text.replace('"byte","byte"', '"Mbyte","Kbyte"').replace('"1,500,000","2,500,000"', '"205.52","1,234.5"')
    raw = bench._ncu.read_raw(text)
    (k,) = raw.kernels
    assert k.metrics["dram__bytes_read.sum"] == pytest.approx(205.52e6)
    assert k.metrics["dram__bytes_write.sum"] == pytest.approx(1234.5e3)
    assert k.metrics["launch__grid_size"] == 512 and k.grid == "(2, 256, 1)"
    assert raw.passes == [("dx_cl", 1)]
    for name in ("dx_cl", "dx_cl<__nv_bfloat16, 8>", "void dx_cl<__nv_bfloat16, 8>(const __nv_bfloat16 *, int)"):
        assert bench._ncu.kernel_base(name) == "dx_cl" and bench._family(name) == "dx"
    assert bench._ncu.kernel_base("void at::native::reduce_kernel<512, 1>(R)") == "reduce_kernel"
    with pytest.raises(ValueError, match="unknown unit 'Pbyte'"):
        bench._ncu.read_raw(text.replace('"Mbyte"', '"Pbyte"'))
    small = ncu_csv(ncu_kernels(shapes=[(2, 512, 32, 32)]))
    assert len(bench.dram_passes(bench._ncu.read_raw(small), [(2, 512, 32, 32)])) == 6
    with pytest.raises(ValueError, match=r"kernel 'moments_cs<float, 4>' \(ncu ID 0\) has no number for "
                                         r"dram__bytes_read.sum \('n/a'\)"):
        bench.dram_passes(bench._ncu.read_raw(small.replace('"4,194,304"', '"n/a"', 1)), [(2, 512, 32, 32)])


def test_raw_csv_without_a_table_says_what_ncu_said():
    text = ("==PROF== Connected to process 7\n==WARNING== No kernels were profiled.\n"
            "==PROF== Disconnected from process 7\n")
    with pytest.raises(ValueError, match=r"no ncu table .* ncu said: ==WARNING== No kernels were profiled\."):
        bench._ncu.read_raw(text)


def test_dram_table_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "ncu_dram.csv"
    path.write_text(ncu_csv(ncu_kernels()))
    assert bench.main(["--dram-table", str(path), "--quick", "--l2-mib", "50"]) == 0
    out = capsys.readouterr().out
    assert "floors: 3N / 5N and the L2-aware floor (L2 50 MiB)" in out and "met on 12 of 12" in out
    assert out.count("`moments_cs<float, 4>`") == 3              # the per-kernel table: float32 NCHW, 3 shapes
    assert bench.main(["--dram-table", str(path)]) == 2          # a --quick profile read as the full one
    assert "but 144 expected" in capsys.readouterr().err
    assert bench.main(["--dram-table", str(tmp_path / "missing.csv"), "--quick"]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_the_gpu_script_profiles_dram_bytes_as_the_table_reads_them():
    """.ci/gpu's DRAM run: the L2 left alone, the metrics and the kernel filter of bench.py, then the table."""
    script = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "gpu")).read()
    command = re.search(r"^ *ncu [^\n]*--cache-control none(?:[^\n]*\\\n)*[^\n]*$", script, re.M)
    assert command, "no ncu run with --cache-control none in .ci/gpu"
    words = command[0].replace("\\\n", " ").split()
    assert words[words.index("--metrics") + 1] == ",".join(bench.DRAM_METRICS)
    assert words[words.index("--kernel-name-base") + 1] == "function"
    assert words[words.index("--kernel-name") + 1] == f"regex:'{bench.KERNEL_REGEX}'"
    assert {"--csv", "--profile-from-start", "--print-units"} <= set(words)
    assert words[words.index("--page") + 1] == "raw"
    assert words[-5:] == ["python3", "-m", "cusyncbn.bench", "--profile", "--quick"]
    assert 'python3 -m cusyncbn.bench --dram-table "${OUT:-.}/ncu_dram.csv" --quick' in script
    # the filter takes cusyncbn's kernels (ncu's function names) and none of the others the profile runs
    for name in ("moments_cs", "moments_cl", "normalize_cs", "normalize_cl", "backward_cs", "backward_cl", "dx_cs",
                 "dx_cl"):
        assert re.search(bench.KERNEL_REGEX, name)
    for name in ("bn_fw_tr_1C11_kernel_NCHW", "bn_bw_1C11_singleread", "batchnorm_bwtr_nhwc_semiPersist",
                 "batch_norm_collect_statistics_kernel", "batch_norm_backward_kernel",
                 "batch_norm_backward_reduce_channels_last_kernel", "batch_norm_backward_elemt_kernel",
                 "vectorized_elementwise_kernel", "unrolled_elementwise_kernel_for_multi_outputs", "reduce_kernel",
                 "CatArrayBatchedCopy", "ncclDevKernel_AllReduce_Sum_f64_RING_LL"):
        assert not re.search(bench.KERNEL_REGEX, name), name
