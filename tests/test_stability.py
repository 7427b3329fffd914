"""Stable at any mean, in float64 too (issue 17, section 4).

The combine of the per-rank moments cancels numbers of size N (mean - K)^2 around the pivot
K; with K far from the data (the running mean starts at 0) float64 loses every digit of a
batch with mean 1e8 and std 1. The float64 two-pass reference on the whole batch is the
oracle; every call is checked, a layer's first and the functional core without running
statistics included, on the NumPy backend and on the CUDA kernels (emulated). The
multi-rank version is the mpi_worker case ``stable_at_any_mean_float64``.
"""
import numpy as np
import pytest

import cusyncbn
import reference as ref
from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward

import cuda_emu


@pytest.fixture(params=["numpy", "emulated kernels"])
def to_device(request, use_backend):
    if request.param == "numpy":
        return np.asarray
    use_backend(cuda_emu.EmuBackend(sms=4))
    return cuda_emu.guarded_copy


def test_the_reported_input():
    """float64, NC, C=1, one process, x = [[1e8], [1e8 + 1]]: var 0.25, so y = -+0.5 / sqrt(0.25 + 1e-5)
    and running_var = 0.9 * 1 + 0.1 * 0.25 (Paddle's momentum convention, biased)."""
    bn = cusyncbn.SyncBatchNorm(1, data_format="NC", dtype="float64", device="cpu", comm=cusyncbn.SingleProcessComm())
    y = bn(np.array([[1e8], [1e8 + 1]]))
    half = 0.5 / np.sqrt(0.25 + 1e-5)
    np.testing.assert_allclose(y[:, 0], [-half, half], rtol=1e-9)
    np.testing.assert_allclose(bn.running_var, [0.925], rtol=1e-12)
    np.testing.assert_allclose(bn.running_mean, [0.1 * (1e8 + 0.5)], rtol=1e-12)


def _check(got, want, what, rtol=1e-6):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.max(np.abs(want)), 1e-300)
    err = np.max(np.abs(got - want)) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g}"


@pytest.mark.parametrize("loc", [1e4, 1e8, -1e8])
def test_every_call_of_a_layer_is_stable(to_device, loc):
    rng = np.random.default_rng(3)
    w, b = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    bn = cusyncbn.SyncBatchNorm(3, data_format="NCL", dtype="float64", device="cpu", comm=cusyncbn.SingleProcessComm())
    bn.weight.data[...] = w
    bn.bias.data[...] = b
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(10):
        x = loc + rng.normal(size=(5, 3, 4)) * rng.uniform(0.5, 2.0, (1, 3, 1))
        dy = rng.normal(size=x.shape)
        bn.clear_gradients()
        y = bn(to_device(x))
        dx = bn.backward(to_device(dy))
        y_ref, mean, var = ref.forward(x, w, b, 1e-5, "NCL")
        dx_ref, dw_ref, db_ref = ref.backward(x, dy, w, 1e-5, "NCL")
        rm, rv = ref.update_running(rm, rv, mean, var, x.size // 3, 0.9)
        for got, want, what in ((y, y_ref, "y"), (dx, dx_ref, "dx"), (bn.weight.grad, dw_ref, "dweight"),
                                (bn.bias.grad, db_ref, "dbias"), (bn.running_mean, rm, "running_mean"),
                                (bn.running_var, rv, "running_var")):
            _check(got, want, f"step {step} {what}")


def test_the_functional_core_without_running_statistics_is_stable(to_device):
    rng = np.random.default_rng(4)
    for _ in range(3):
        x = 1e8 + rng.normal(size=(6, 2, 3))
        dy = rng.normal(size=x.shape)
        y, ctx = sync_batch_norm(to_device(x), data_format="NCL", device="cpu")
        dx, dw, db = sync_batch_norm_backward(ctx, to_device(dy))
        y_ref, _, _ = ref.forward(x, np.ones(2), np.zeros(2), 1e-5, "NCL")
        dx_ref, _, _ = ref.backward(x, dy, np.ones(2), 1e-5, "NCL")
        _check(y, y_ref, "y")
        _check(dx, dx_ref, "dx")


def test_the_check_can_fail_a_far_pivot_loses_the_variance(to_device):
    """Negative control: the same combine around K = 0 (the old pivot) is off by far more than 1e-6."""
    from cusyncbn._backend import ForwardPayload, Stats
    from cusyncbn._backend_factory import get_backend
    backend = get_backend("cpu")
    x = 1e8 + np.random.default_rng(5).normal(size=(6, 2, 3))
    stats = Stats(backend.zeros((Stats.size(2),), np.float64), backend.zeros((ForwardPayload.size(2),), np.float64), 2)
    backend.local_moments(x3=to_device(x), pivot_state=None, tag=1, buf=stats.payload)           # pivot 0
    y = backend.empty(x.shape, np.float64)
    backend.normalize_batch(x3=to_device(x), buf=stats.payload, tag=1, ranks=1, running_mean=None, running_var=None,
                            momentum=0.9, eps=1e-5, unbiased=False, weight=None, bias=None, stats=stats, y3=y)
    y_ref, _, _ = ref.forward(x, np.ones(2), np.zeros(2), 1e-5, "NCL")
    err = np.max(np.abs(np.asarray(y) - y_ref))
    assert err > 1e-3, err
