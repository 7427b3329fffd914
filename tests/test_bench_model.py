"""The whole-model benchmark (``python -m cusyncbn.bench --model``): its report from
synthetic step times, its training-step loop on the CPU with a small model, and its skip
without torchvision or a CUDA device (the timing itself needs a GPU: not run here)."""
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

from cusyncbn import _bench_model as bm
from cusyncbn import bench
from cusyncbn._bench_cases import host_us

B32, B2 = (32, 3, 224, 224), (2, 3, 512, 512)

# Step times in seconds, with the images/s worked out by hand (batch / median):
TIMES = [
    (B32, "float32", [0.1, 0.2, 0.3], [0.3, 0.2, 0.1, 0.2, 0.2]),   # 32/0.2 = 160; 32/0.2 = 160: ratio 1
    (B32, "bfloat16", [0.02, 0.06, 0.04, 0.04], [0.032]),          # median (0.04+0.04)/2: 800; 1000: 1.25
    (B2, "float32", [0.024, 0.03, 0.024], [0.05, 0.025, 0.02]),     # 2/0.024 = 83.3; 2/0.025 = 80: 0.96
    (B2, "bfloat16", [0.01], [0.0125, 0.0125]),                     # 200; 160: ratio 0.8, the smallest
]


def test_rows_from_step_times():
    rows = bm.model_rows(TIMES)
    assert [(r.shape, r.batch, r.precision) for r in rows] == [(s, s[0], p) for s, p, _, _ in TIMES]
    want = [(160.0, 160.0, 1.0, True), (800.0, 1000.0, 1.25, True), (2 / 0.024, 80.0, 0.96, False),
            (200.0, 160.0, 0.8, False)]
    for r, (plain, converted, ratio, meets) in zip(rows, want):
        assert r.plain == pytest.approx(plain) and r.converted == pytest.approx(converted)
        assert r.ratio == pytest.approx(ratio) and r.meets is meets


def test_target_boundary_and_negative_control():
    same = [0.05, 0.05]
    assert bm.model_rows([(B2, "float32", same, same)], target=1.0)[0].meets     # ratio exactly 1.0
    # 0.96 misses the 0.97 target; the same times meet a target of 0.95.
    row = (B2, "float32", [0.024], [0.025])
    assert bm.model_rows([row])[0].ratio == pytest.approx(0.96)
    assert not bm.model_rows([row])[0].meets
    assert bm.model_rows([row], target=0.95)[0].meets


def test_table_and_summary_line(tmp_path):
    rows = bm.model_rows(TIMES)
    text = bm.format_model_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| input (N x C x H x W) | precision |") and lines[0].endswith("| >= 0.97 |")
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2] == "| 32 x 3 x 224 x 224 | float32 | 160.0 | 160.0 | 1.000 | yes |"
    assert lines[3] == "| 32 x 3 x 224 x 224 | bfloat16 | 800.0 | 1000.0 | 1.250 | yes |"
    assert lines[4] == "| 2 x 3 x 512 x 512 | float32 | 83.3 | 80.0 | 0.960 | no |"
    assert lines[5] == "| 2 x 3 x 512 x 512 | bfloat16 | 200.0 | 160.0 | 0.800 | no |"
    assert lines[6] == ""
    assert lines[7] == "model: converted/plain images/s ratio min 0.800 (batch 2, bfloat16); 2 of 4 rows >= 0.97"
    assert len(lines) == 8
    written = bm.write_model_report(str(tmp_path / "out"), rows, head="Card: Test card")
    assert (tmp_path / "out" / "model.md").read_text() == written
    assert written == "Card: Test card\n\n" + text + "\n"


def test_min_row_is_named_whichever_it_is():
    rows = bm.model_rows([(B32, "float32", [0.2], [0.25]),      # 160 vs 128: 0.8
                          (B2, "bfloat16", [0.01], [0.01])])    # 1.0
    assert bm.summary_line(rows) == ("model: converted/plain images/s ratio min 0.800 (batch 32, float32); "
                                     "1 of 2 rows >= 0.97")


def test_failed_run_counts_as_missed():
    rows = bm.model_rows([(B32, "float32", [0.2], None), (B2, "bfloat16", [0.01], [0.01])])
    assert math.isnan(rows[0].converted) and math.isnan(rows[0].ratio) and not rows[0].meets
    assert rows[0].plain == pytest.approx(160.0)
    assert "| 32 x 3 x 224 x 224 | float32 | 160.0 | failed | failed | no |" in bm.format_model_table(rows)
    assert bm.summary_line(rows) == ("model: converted/plain images/s ratio min 1.000 (batch 2, bfloat16); "
                                     "1 of 2 rows >= 0.97; 1 failed")
    nothing = bm.model_rows([(B2, "float32", None, None)])
    assert bm.summary_line(nothing) == "model: converted/plain images/s ratio min n/a; 0 of 1 rows >= 0.97; 1 failed"


@pytest.mark.parametrize("times", [[], [0.1, 0.0], [-0.1], [float("nan")], [float("inf")]])
def test_bad_step_times_raise(times):
    with pytest.raises(ValueError):
        bm.model_rows([(B2, "float32", times, [0.1])])
    with pytest.raises(ValueError):
        bm.images_per_second(2, times)


def test_bad_reps_is_an_error():
    assert bench.main(["--model", "--reps", "0"]) == 2


def _has(module):
    return importlib.util.find_spec(module) is not None


def test_cli_skips_without_torchvision_or_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if _has("torchvision") and torch.cuda.is_available() and _has("cupy"):
        pytest.skip("torchvision, CuPy and a CUDA device are present: --model would run the benchmark")
    proc = subprocess.run([sys.executable, "-m", "cusyncbn.bench", "--model", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cusyncbn.bench --model: skipped: "), proc.stdout
    if not _has("torchvision"):
        assert "pip install torchvision" in lines[0]
    if not torch.cuda.is_available():
        assert "no CUDA device (torch.cuda.is_available() is False)" in lines[0]
    assert not (tmp_path / "model.md").exists()


def _small_model():
    import torch
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
                               torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 1000))


def _host_time(step):
    """Seconds of one ``step()`` by the benchmark's host timer (the CPU's stand-in for CUDA events)."""
    return host_us(step) * 1e-6


def _losses(out):
    """{model: first-step loss} from _measure's progress line."""
    return {k: float(v) for k, v in re.findall(r"(plain|converted) (\d+\.\d+)(?=[,;])", out)}


def test_step_loop_on_cpu(capsys):
    """The loop the GPU run uses (deepcopy + convert, SGD step, zero_grad(set_to_none=True)),
    on the CPU in float32: both models time every step and start from the same loss."""
    pytest.importorskip("torch")
    from cusyncbn import SingleProcessComm
    plain, converted = bm._measure((4, 3, 8, 8), "float32", SingleProcessComm(), reps=3, warmup=2,
                                   make_model=_small_model, device="cpu", time_step=_host_time)
    assert len(plain) == 3 and len(converted) == 3 and all(t > 0 for t in plain + converted)
    out = capsys.readouterr().out
    assert "failed" not in out and "2 batch norms converted" in out
    losses = _losses(out)
    assert set(losses) == {"plain", "converted"} and losses["plain"] == pytest.approx(losses["converted"], rel=1e-5)


def test_step_loop_bfloat16_channels_last_on_cpu(capsys):
    """The bfloat16 autocast + channels_last loop on the CPU: both models run (cusyncbn.torch
    computes 16-bit CPU input in float32, as torch does) and reach the same losses."""
    pytest.importorskip("torch")
    from cusyncbn import SingleProcessComm
    plain, converted = bm._measure((4, 3, 8, 8), "bfloat16", SingleProcessComm(), reps=3, warmup=2,
                                   make_model=_small_model, device="cpu", time_step=_host_time)
    assert len(plain) == 3 and all(t > 0 for t in plain)
    out = capsys.readouterr().out
    assert converted is not None, out
    losses = _losses(out)
    assert len(converted) == 3 and losses["plain"] == pytest.approx(losses["converted"], rel=1e-2)


class _FailingComm:
    """Two ranks whose all-reduce fails: the converted model's first forward raises."""
    rank, size = 0, 2

    def allreduce(self, buf):
        raise RuntimeError("all-reduce refused (test)")


def test_failed_model_is_reported_and_the_other_still_timed(capsys):
    pytest.importorskip("torch")
    plain, converted = bm._measure((4, 3, 8, 8), "float32", _FailingComm(), reps=3, warmup=2,
                                   make_model=_small_model, device="cpu", time_step=_host_time)
    assert converted is None and len(plain) == 3
    out = capsys.readouterr().out
    assert "4 x 3 x 8 x 8 float32 converted: failed (RuntimeError: all-reduce refused (test))" in out
    assert out.count("failed") == 1                      # reported once, not at every step
    row, = bm.model_rows([((4, 3, 8, 8), "float32", plain, converted)])
    assert not row.meets and math.isnan(row.ratio)
