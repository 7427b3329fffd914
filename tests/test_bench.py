"""The benchmark's report (the timing itself needs a GPU: see .ci/gpu)."""
from cusyncbn import bench


def row(shape, dtype, name, fwd_ms, bwd_ms, ok=True):
    numel = 1
    for n in shape:
        numel *= n
    item = 4 if dtype == "float32" else 2
    bw = 3e12
    return (shape, dtype, "NCHW", name, fwd_ms, 3 * numel * item / (fwd_ms * 1e-3) / bw, bwd_ms,
            5 * numel * item / (bwd_ms * 1e-3) / bw, 1e-6, ok)


def test_summary_states_speedups_and_targets(tmp_path, capsys):
    big, small = (64, 256, 56, 56), (2, 512, 32, 32)
    rows = [row(big, "float32", bench.OURS, 0.30, 0.35), row(big, "float32", bench.CUDNN, 0.25, 0.45),
            row(big, "float32", bench.TORCH_SYNC, 0.70, 0.55),
            row(small, "float16", bench.OURS, 0.02, 0.02), row(small, "float16", bench.TORCH_SYNC, 0.30, 0.20),
            row(small, "bfloat16", bench.OURS, 0.02, 0.02, ok=False)]
    lines = bench.summary(rows)
    assert len(lines) == 2 + 3
    first = lines[2].split("|")
    assert first[4].strip() == f"{rows[0][5]:.0%}" and first[5].strip() == f"{rows[0][7]:.0%}"
    assert float(first[6]) == round((0.70 + 0.55) / (0.30 + 0.35), 1)   # vs the sync path
    assert float(first[7]) == round((0.25 + 0.45) / (0.30 + 0.35), 2)   # vs cuDNN
    assert "< 85% floor" in lines[2] and "< 3x sync" in lines[2]         # fwd at 68% of the floor
    assert lines[3].strip().endswith("| met |")                           # small: floor not required
    assert "WRONG" in lines[4] and "< 3x sync" in lines[4]                # no sync run: not shown as met
    bench._write(str(tmp_path), "Test card", 3e12, rows, 12.5)
    text = (tmp_path / "results.md").read_text()
    assert "Test card" in text and text.count("| cusyncbn |") == 3 and "Summary" in text
    assert "host overhead per cusyncbn call 12.5 us" in capsys.readouterr().out


def test_without_a_gpu_it_says_so(capsys):
    import pytest
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark would run")
    assert bench.main([]) == 2
    assert "needs" in capsys.readouterr().err
