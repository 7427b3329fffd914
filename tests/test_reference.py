"""The oracle itself: finite differences, and Paddle's printed example."""
import numpy as np
import pytest

import reference as ref


def _finite_differences(loss, args, h=1e-6):
    """Central differences of ``loss`` with respect to each of ``args`` (arrays), element by element."""
    grads = []
    for arg in range(len(args)):
        fd = np.zeros_like(args[arg])
        for i in np.ndindex(fd.shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[arg][i] += h
            minus[arg][i] -= h
            fd[i] = (loss(*plus) - loss(*minus)) / (2 * h)
        grads.append(fd)
    return grads


@pytest.mark.parametrize("data_format,shape", [("NCHW", (3, 2, 2, 3)), ("NHWC", (2, 3, 2, 2)), ("NC", (5, 3))])
def test_reference_gradient_matches_finite_differences(data_format, shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    c = shape[-1] if ref.CHANNEL_LAST[data_format] else shape[1]
    w, b, dy = rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape)

    def loss(x_, w_, b_):
        return float((ref.forward(x_, w_, b_, 1e-5, data_format)[0] * dy).sum())

    for grad, fd in zip(ref.backward(x, dy, w, 1e-5, data_format), _finite_differences(loss, [x, w, b])):
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


def test_reference_reproduces_paddle_example():
    x = np.array([[[[0.3, 0.4], [0.3, 0.07]], [[0.83, 0.37], [0.18, 0.93]]]])
    y, _, _ = ref.forward(x, np.ones(2), np.zeros(2), 1e-5, "NCHW")
    expected = [[[[0.26824948, 1.09363246], [0.26824948, -1.63013160]],
                 [[0.80956620, -0.66528702], [-1.27446556, 1.13018656]]]]
    np.testing.assert_allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("data_format,shape", [("NCHW", (3, 2, 2, 3)), ("NHWC", (2, 3, 2, 2))])
def test_fused_reference_gradients_match_finite_differences(data_format, shape, activation):
    """y = act(BN(x) + residual), training and eval: dx, dweight, dbias and dresidual of the
    formulas equal the loss's finite differences (no pre-activation within 1e-3 of the kink)."""
    rng = np.random.default_rng(1)
    c = shape[-1] if ref.CHANNEL_LAST[data_format] else shape[1]
    x, r, dy = rng.normal(size=shape), rng.normal(size=shape), rng.normal(size=shape)
    w, b = rng.normal(size=c), rng.normal(size=c)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    pre = ref.forward(x, w, b, 1e-5, data_format)[0] + r
    assert np.abs(pre).min() > 1e-3 and (activation is None or (pre < 0).any())

    def train_loss(x_, w_, b_, r_):
        return float((ref.fused_forward(x_, w_, b_, 1e-5, data_format, r_, activation)[0] * dy).sum())

    def eval_loss(x_, w_, b_, r_):
        return float((ref.fused_eval_forward(x_, w_, b_, rm, rv, 1e-5, data_format, r_, activation) * dy).sum())

    for loss, grads in ((train_loss, ref.fused_backward(x, dy, w, b, 1e-5, data_format, r, activation)),
                        (eval_loss, ref.fused_eval_backward(x, dy, w, b, rm, rv, 1e-5, data_format, r, activation))):
        for grad, fd in zip(grads, _finite_differences(loss, [x, w, b, r])):
            np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


def test_fused_reference_refuses_other_activations():
    with pytest.raises(ValueError, match="activation must be one of"):
        ref.fused_forward(np.ones((2, 3)), 1.0, 0.0, 1e-5, "NC", activation="gelu")
