"""The oracle itself: finite differences, and Paddle's printed example."""
import numpy as np
import pytest

import reference as ref


@pytest.mark.parametrize("data_format,shape", [("NCHW", (3, 2, 2, 3)), ("NHWC", (2, 3, 2, 2)), ("NC", (5, 3))])
def test_reference_gradient_matches_finite_differences(data_format, shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    c = shape[-1] if ref.CHANNEL_LAST[data_format] else shape[1]
    w, b, dy = rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape)

    def loss(x_, w_, b_):
        return float((ref.forward(x_, w_, b_, 1e-5, data_format)[0] * dy).sum())

    dx, dw, db = ref.backward(x, dy, w, 1e-5, data_format)
    h = 1e-6
    for grad, arg in ((dx, 0), (dw, 1), (db, 2)):
        args = [x, w, b]
        fd = np.zeros_like(args[arg])
        for i in np.ndindex(fd.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[arg][i] += h
            minus[arg][i] -= h
            fd[i] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


def test_reference_reproduces_paddle_example():
    x = np.array([[[[0.3, 0.4], [0.3, 0.07]], [[0.83, 0.37], [0.18, 0.93]]]])
    y, _, _ = ref.forward(x, np.ones(2), np.zeros(2), 1e-5, "NCHW")
    expected = [[[[0.26824948, 1.09363246], [0.26824948, -1.63013160]],
                 [[0.80956620, -0.66528702], [-1.27446556, 1.13018656]]]]
    np.testing.assert_allclose(y, expected, atol=1e-6)
