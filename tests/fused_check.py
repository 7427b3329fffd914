"""One check of the fused epilogue, shared by the NumPy, emulated-kernel and GPU tests.

``check_fused(...)`` runs two training steps (the first call of the running statistics
makes two forward all-reduces, the next one) and an eval step of
``sync_batch_norm(..., activation=..., residual=...)`` and its backward through the
functional core, and compares y, dx, dweight, dbias, dresidual and the running statistics
with the float64 reference written from the formulas (``cusyncbn._reference.fused_*``).
``to_device(array, dtype, role)`` (role: "x", "dy", "residual", "weight", "bias",
"running_mean", "running_var") and ``to_host`` move arrays to the backend's kind of array
and back.
"""
import numpy as np

import reference as ref
from comms import CountingComm
from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward

TOL = {"float16": 3e-2, "bfloat16": 1e-1, "float32": 1e-4, "float64": 1e-9}


def close(got, want, tol, what, to_host, grad_size=None):
    """``got`` (on the device) within ``tol`` of ``want``; parameter gradients (``grad_size``:
    the elements summed) get the layer check's sum tolerance."""
    if grad_size is not None:
        np.testing.assert_allclose(to_host(got), want, rtol=1e-3, atol=1e-3 * np.sqrt(grad_size), err_msg=what)
    else:
        np.testing.assert_allclose(to_host(got), want, rtol=tol, atol=tol, err_msg=what)


def check_fused(data_format, shape, dtype, activation, residual, to_device, to_host, device=None, seed=0,
                steps=2):
    """Train ``steps`` steps, then one eval step, with the epilogue; everything against the
    reference. Returns the outputs of every step (for bitwise comparisons between paths)."""
    rng = np.random.default_rng(seed)
    c = shape[-1] if ref.CHANNEL_LAST[data_format] else shape[1]
    pdtype = "float64" if dtype == "float64" else "float32"
    w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    wd, bd = to_device(w, pdtype, "weight"), to_device(b, pdtype, "bias")
    w, b = to_host(wd), to_host(bd)
    rm_d, rv_d = to_device(np.zeros(c), pdtype, "running_mean"), to_device(np.ones(c), pdtype, "running_var")
    rm, rv = np.zeros(c), np.ones(c)
    comm = CountingComm()
    tol = TOL[dtype]
    outputs = []
    for step in range(steps):
        xd = to_device(rng.normal(0.5, 2.0, size=shape), dtype, "x")
        dyd = to_device(rng.normal(size=shape), dtype, "dy")
        rd = to_device(rng.normal(size=shape), dtype, "residual") if residual else None
        x, dy, r = to_host(xd), to_host(dyd), (to_host(rd) if residual else None)  # the values the passes see
        y, ctx = sync_batch_norm(xd, rm_d, rv_d, wd, bd, momentum=0.7, data_format=data_format, comm=comm,
                                 device=device, activation=activation, residual=rd)
        grads = sync_batch_norm_backward(ctx, dyd)
        assert len(grads) == (4 if residual else 3)
        y_ref, mean, var = ref.fused_forward(x, w, b, 1e-5, data_format, r, activation)
        dx_ref, dw_ref, db_ref, dr_ref = ref.fused_backward(x, dy, w, b, 1e-5, data_format, r, activation)
        rm, rv = ref.update_running(rm, rv, mean, var, x.size // c, 0.7)
        where = f"{data_format} {shape} {dtype} activation={activation} residual={residual} step {step}"
        close(y, y_ref, tol, f"{where}: y", to_host)
        close(grads[0], dx_ref, tol, f"{where}: dx", to_host)
        close(grads[1], dw_ref, tol, f"{where}: dweight", to_host, x.size // c)
        close(grads[2], db_ref, tol, f"{where}: dbias", to_host, x.size // c)
        if residual:
            close(grads[3], dr_ref, tol, f"{where}: dresidual", to_host)
            assert grads[3].dtype == xd.dtype and grads[3].shape == xd.shape
        np.testing.assert_allclose(to_host(rm_d), rm, rtol=1e-4, atol=1e-5, err_msg=f"{where}: running mean")
        np.testing.assert_allclose(to_host(rv_d), rv, rtol=1e-4, atol=1e-5, err_msg=f"{where}: running var")
        assert y.dtype == xd.dtype and grads[0].dtype == xd.dtype
        outputs.append([to_host(a) for a in (y, *grads, rm_d, rv_d)])
    # Two forward all-reduces on the first call (no pivot yet), then one per pass.
    assert comm.calls == 3 + 2 * (steps - 1)
    y, ctx = sync_batch_norm(xd, rm_d, rv_d, wd, bd, training=False, data_format=data_format, comm=comm,
                             device=device, activation=activation, residual=rd)
    grads = sync_batch_norm_backward(ctx, dyd)
    where = f"{data_format} {shape} {dtype} activation={activation} residual={residual} eval"
    rm_now, rv_now = to_host(rm_d), to_host(rv_d)
    close(y, ref.fused_eval_forward(x, w, b, rm_now, rv_now, 1e-5, data_format, r, activation), tol, f"{where}: y",
          to_host)
    want = ref.fused_eval_backward(x, dy, w, b, rm_now, rv_now, 1e-5, data_format, r, activation)
    close(grads[0], want[0], tol, f"{where}: dx", to_host)
    close(grads[1], want[1], tol, f"{where}: dweight", to_host, x.size // c)
    close(grads[2], want[2], tol, f"{where}: dbias", to_host, x.size // c)
    if residual:
        close(grads[3], want[3], tol, f"{where}: dresidual", to_host)
    assert comm.calls == 3 + 2 * (steps - 1), "eval made a collective"
    outputs.append([to_host(a) for a in (y, *grads)])
    return outputs
