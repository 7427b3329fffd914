"""The benchmark's report and its targets, fed synthetic results (the timing itself needs a
GPU: see .ci/gpu)."""
import os
import re

import pytest

from cusyncbn import bench

BIG, SMALL = (64, 256, 56, 56), (2, 512, 32, 32)      # 196 MiB in float32; 4 MiB in float32


def row(shape, dtype, name, fwd_ms, bwd_ms, ok=True, bw=3e12):
    numel = 1
    for n in shape:
        numel *= n
    item = 4 if dtype == "float32" else 2
    return (shape, dtype, "NCHW", name, fwd_ms, 3 * numel * item / (fwd_ms * 1e-3) / bw, bwd_ms,
            5 * numel * item / (bwd_ms * 1e-3) / bw, 1e-6, ok)


def floor_ms(shape, dtype, passes, fraction, bw=3e12):
    """The time at which ``passes`` * numel * itemsize bytes run at ``fraction`` of the floor."""
    numel = 1
    for n in shape:
        numel *= n
    return passes * numel * (4 if dtype == "float32" else 2) / (fraction * bw) * 1e3


def targets(rows):
    """{(shape, dtype): the targets column} of the summary of ``rows``."""
    lines = bench.summary(rows)
    assert lines[0].startswith("| shape |") and lines[1].startswith("|---")
    return {(cells[1].strip(), cells[2].strip()): cells[8].strip() for cells in (l.split("|") for l in lines[2:])}


def test_summary_states_speedups_and_misses(tmp_path, capsys):
    rows = [row(BIG, "float32", bench.OURS, 0.30, 0.35), row(BIG, "float32", bench.CUDNN, 0.25, 0.45),
            row(BIG, "float32", bench.TORCH_SYNC, 0.70, 0.55),
            row(SMALL, "float16", bench.OURS, 0.02, 0.02), row(SMALL, "float16", bench.TORCH_SYNC, 0.30, 0.20),
            row(SMALL, "float16", bench.CUDNN, 0.03, 0.02),
            row(SMALL, "bfloat16", bench.OURS, 0.02, 0.02, ok=False)]
    lines = bench.summary(rows)
    assert len(lines) == 2 + 3
    first = lines[2].split("|")
    assert first[4].strip() == f"{rows[0][5]:.0%}" and first[5].strip() == f"{rows[0][7]:.0%}"
    assert float(first[6]) == round((0.70 + 0.55) / (0.30 + 0.35), 1)   # vs the sync path: 1.9
    assert float(first[7]) == round((0.25 + 0.45) / (0.30 + 0.35), 2)   # vs cuDNN: 1.08
    assert first[8].strip() == "< 85% floor, < 2x sync"                  # fwd at 68% of the floor
    assert lines[3].strip().endswith("| met |")                           # small: no floor target
    assert "WRONG" in lines[4] and "< 2x sync" in lines[4] and "slower than cuDNN" in lines[4]   # none ran: missed
    bench._write(str(tmp_path), "Test card", 3e12, rows, 12.5, 18.6)
    text = (tmp_path / "results.md").read_text()
    assert "Test card" in text and text.count("| cusyncbn |") == 3 and bench.TARGETS in text
    assert "cusyncbn 12.5 us" in text and "batch_norm 18.6 us" in text and "ratio 0.67 (met" in text
    out = capsys.readouterr().out
    assert "ratio 0.67 (met" in out and lines[2] in out


@pytest.mark.parametrize("shape,dtype,large", [(BIG, "float32", True), (BIG, "bfloat16", True),
                                               ((4, 256, 128, 128), "float32", True),     # exactly 64 MiB
                                               ((4, 256, 128, 128), "float16", False),    # 32 MiB
                                               (SMALL, "float32", False)])
def test_floor_target_only_on_large_inputs(shape, dtype, large):
    fast = [row(shape, dtype, bench.CUDNN, 10.0, 10.0), row(shape, dtype, bench.TORCH_SYNC, 10.0, 10.0)]
    at = {f: row(shape, dtype, bench.OURS, floor_ms(shape, dtype, 3, f), floor_ms(shape, dtype, 5, f))
          for f in (0.84, 0.86)}
    assert targets([at[0.86]] + fast) == {(str(shape), dtype): "met"}
    assert targets([at[0.84]] + fast) == {(str(shape), dtype): "< 85% floor" if large else "met"}
    slow_bwd = row(shape, dtype, bench.OURS, floor_ms(shape, dtype, 3, 0.9), floor_ms(shape, dtype, 5, 0.8))
    assert targets([slow_bwd] + fast) == {(str(shape), dtype): "< 85% floor" if large else "met"}


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


def test_h200_results_in_the_docs_are_graded_as_the_summary_grades_them():
    """docs/PERFORMANCE.md grades the H200 run of 2026-11-26 against today's targets: the
    summary, fed the printed numbers, must agree row by row."""
    doc = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                            "PERFORMANCE.md")).read()
    printed = re.findall(r"^\| (\([\d, ]+\)) \| (\w+) \| (NCHW|NHWC) \| (\d+)% \| (\d+)% \| ([\d.]+) \| "
                         r"([\d.]+) \| [^|]+ \| ([^|]+) \|$", doc, re.M)
    assert len(printed) == 36
    for shape, dtype, layout, ff, bf, vs_sync, vs_cudnn, graded in printed:
        shape = tuple(int(n) for n in shape.strip("()").split(", "))
        ours = row(shape, dtype, bench.OURS, floor_ms(shape, dtype, 3, int(ff) / 100),
                   floor_ms(shape, dtype, 5, int(bf) / 100))
        half = (ours[4] + ours[6]) / 2
        rows = [ours, row(shape, dtype, bench.TORCH_SYNC, half * float(vs_sync), half * float(vs_sync)),
                row(shape, dtype, bench.CUDNN, half * float(vs_cudnn), half * float(vs_cudnn))]
        assert targets(rows) == {(str(shape), dtype): graded.strip()}, (shape, dtype, layout)


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
