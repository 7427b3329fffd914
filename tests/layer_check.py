"""One layer check shared by the GPU tests and the emulated-kernel tests.

``check_layer(...)`` runs a training forward + backward and an eval forward of one
SyncBatchNorm on ``device`` and compares y, dx, the parameter gradients and the
running statistics against the float64 reference, per dtype with its tolerance.
``to_device`` / ``to_host`` move arrays to the layer's kind of array and back.
"""
import numpy as np

import cusyncbn
import reference as ref

TOL = {"float16": 3e-2, "bfloat16": 1e-1, "float32": 1e-4, "float64": 1e-9}
# Odd channel counts, sizes that are not multiples of the vector width, 2-D to 5-D.
SHAPES = [("NCHW", (4, 5, 7, 3)), ("NCHW", (8, 64, 16, 16)), ("NHWC", (3, 5, 6, 7)), ("NHWC", (4, 7, 7, 256)),
          ("NC", (37, 9)), ("NCL", (5, 3, 33)), ("NLC", (5, 33, 8)), ("NCDHW", (2, 3, 3, 4, 5)),
          ("NDHWC", (2, 3, 4, 5, 16)), ("NCHW", (64, 2048, 2, 2)), ("NHWC", (1, 1, 1, 3)),
          # vectors of the elementwise passes straddling channels: rows of 6 channels, runs of 3
          ("NHWC", (4, 3, 5, 6)), ("NCHW", (8, 4, 1, 3))]


def check_layer(data_format, shape, dtype, to_device, to_host, device, param_dtype=None, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1] if ref.CHANNEL_LAST[data_format] else shape[1]
    x = rng.normal(3.0, 2.0, size=shape)
    dy = rng.normal(size=shape)
    xd, dyd = to_device(x, dtype), to_device(dy, dtype)
    x, dy = to_host(xd), to_host(dyd)                    # the values the kernels really see
    pdtype = param_dtype or ("float64" if dtype == "float64" else "float32")
    bn = cusyncbn.SyncBatchNorm(c, data_format=data_format, device=device, dtype=pdtype, momentum=0.7)
    w = rng.uniform(0.5, 1.5, c).astype(pdtype)
    b = rng.normal(size=c).astype(pdtype)
    bn.weight.data[...] = to_device(w, pdtype)
    bn.bias.data[...] = to_device(b, pdtype)
    y = bn(xd)
    dx = bn.backward(dyd)
    y_ref, mean, var = ref.forward(x, w, b, 1e-5, data_format)
    dx_ref, dw, db = ref.backward(x, dy, w, 1e-5, data_format)
    rm, rv = ref.update_running(np.zeros(c), np.ones(c), mean, var, x.size // c, 0.7)
    tol = TOL[dtype]
    np.testing.assert_allclose(to_host(y), y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(to_host(dx), dx_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(to_host(bn.weight.grad), dw, rtol=1e-3, atol=1e-3 * np.sqrt(x.size))
    np.testing.assert_allclose(to_host(bn.bias.grad), db, rtol=1e-3, atol=1e-3 * np.sqrt(x.size))
    np.testing.assert_allclose(to_host(bn.running_mean), rm, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_host(bn.running_var), rv, rtol=1e-4, atol=1e-5)
    assert y.dtype == xd.dtype and dx.dtype == xd.dtype
    bn.eval()
    y_eval = bn(xd)
    np.testing.assert_allclose(to_host(y_eval), ref.eval_forward(x, w, b, to_host(bn.running_mean),
                                                                 to_host(bn.running_var), 1e-5, data_format),
                               rtol=tol, atol=tol)
    dx_eval = bn.backward(dyd)
    np.testing.assert_allclose(to_host(dx_eval), ref.eval_backward(dy, w, to_host(bn.running_var), 1e-5,
                                                                   data_format), rtol=tol, atol=tol)
