"""Non-finite statistics (issue 17, section 5): with nonfinite="raise" nothing moves, and the
message names the channels and the rank; on the CPU at once, on the (emulated) GPU through the
report slot, which carries the first non-finite channel."""
import numpy as np
import pytest

import cusyncbn
from cusyncbn.functional import flush_reports

import cuda_emu


def batch(bad_channels=(1, 3)):
    x = np.random.default_rng(0).normal(size=(4, 5, 3))
    for c in bad_channels:
        x[0, c, 0] = np.nan
    return x


def layer(nonfinite, name="bn7"):
    # (a layer warns once: each warning test has a layer name of its own)
    return cusyncbn.SyncBatchNorm(5, data_format="NCL", dtype="float64", device="cpu", name=name,
                                  comm=cusyncbn.SingleProcessComm(), nonfinite=nonfinite)


def test_raise_leaves_every_running_statistic_and_names_the_channels_and_rank():
    bn = layer("raise")
    bn(np.random.default_rng(1).normal(size=(4, 5, 3)))
    before = (np.array(bn.running_mean), np.array(bn.running_var))
    with pytest.raises(FloatingPointError) as raised:
        bn(batch())
    text = str(raised.value)
    assert "bn7: the global batch statistics of channels 1, 3 are not finite" in text
    assert "reported on rank 0 of 1" in text and "every channel were left unchanged" in text
    np.testing.assert_array_equal(bn.running_mean, before[0])         # finite channels 0, 2, 4 too
    np.testing.assert_array_equal(bn.running_var, before[1])


def test_warn_moves_the_finite_channels_only_and_names_the_bad_ones():
    """The counterpart (and negative control of the test above): "warn" moves channels 0, 2, 4."""
    bn = layer("warn", "bn8")
    bn(np.random.default_rng(1).normal(size=(4, 5, 3)))
    before = np.array(bn.running_mean)
    with pytest.warns(RuntimeWarning, match="channels 1, 3 are not finite"):
        bn(batch())
    moved = bn.running_mean != before
    assert moved.tolist() == [True, False, True, False, True]


def test_the_emulated_gpu_reports_the_first_channel_and_moves_nothing(use_backend):
    use_backend(cuda_emu.EmuBackend(sms=4))
    bn = layer("raise")
    for _ in range(2):
        bn(cuda_emu.guarded_copy(np.random.default_rng(1).normal(size=(4, 5, 3))))
    before = (np.array(bn.running_mean), np.array(bn.running_var))
    bn(cuda_emu.guarded_copy(batch((3, 1))))                             # planned; the report goes to a slot
    with pytest.raises(FloatingPointError, match="channel 1 \\(the first\\) are not finite"):
        flush_reports()
    np.testing.assert_array_equal(bn.running_mean, before[0])
    np.testing.assert_array_equal(bn.running_var, before[1])
    warn = layer("warn", "bn9")
    for _ in range(2):
        warn(cuda_emu.guarded_copy(np.random.default_rng(1).normal(size=(4, 5, 3))))
    before = np.array(warn.running_mean)
    warn(cuda_emu.guarded_copy(batch((3,))))
    with pytest.warns(RuntimeWarning, match="channel 3 \\(the first\\)"):
        flush_reports()
    assert (np.array(warn.running_mean) != before).tolist() == [True, True, True, False, True]


def test_a_backward_with_inf_leaks_no_numpy_warning():
    """Issue 17 §5: the forward silenced NumPy's RuntimeWarnings for NaN/Inf, the backward did not."""
    import warnings
    bn = layer("warn", "bn10")
    bn(np.random.default_rng(2).normal(size=(4, 5, 3)))
    dy = np.ones((4, 5, 3))
    dy[1, 2, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # any warning fails the test
        dx = bn.backward(dy)
    assert not np.isfinite(dx[:, 2]).all() and np.isfinite(dx[:, [0, 1, 3, 4]]).all()
