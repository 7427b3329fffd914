"""GPU backend (CuPy kernels + NCCL): skipped without a CUDA device, run on the GPU machine.

Every check compares against the float64 reference on the global batch, per dtype
with its tolerance, on shapes with odd channel counts and sizes that are not
multiples of the vector width.
"""
import numpy as np
import pytest

import cusyncbn
import reference as ref
from cusyncbn._backend_factory import get_backend
from fused_check import check_fused
from layer_check import SHAPES, TOL, check_layer
from test_mpi import CASES, GPU_CASES, run_ranks

pytestmark = pytest.mark.gpu


@pytest.fixture
def torch_float32():
    """torch, with float32 convolutions and matmuls in float32 rather than TF32 (torch's
    default on Ampere and newer GPUs, ~1e-3 off) while the test compares against torch."""
    torch = pytest.importorskip("torch")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def to_device(a, dtype):
    import cupy
    if dtype == "bfloat16":
        torch = pytest.importorskip("torch")
        t = torch.from_numpy(np.asarray(a, np.float32)).cuda().to(torch.bfloat16)
        return cupy.from_dlpack(t)
    return cupy.asarray(np.asarray(a).astype(dtype))


def to_host(a):
    import cupy
    if a.dtype.name == "bfloat16":
        import torch
        return torch.from_dlpack(a).float().cpu().numpy().astype(np.float64)
    return cupy.asnumpy(a).astype(np.float64)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("data_format,shape", SHAPES)
def test_kernels_match_reference(data_format, shape, dtype):
    check_layer(data_format, shape, dtype, to_device, to_host, device="gpu")


FUSED_SHAPES = [("NCHW", (4, 5, 7, 3)), ("NCHW", (8, 64, 16, 16)), ("NHWC", (3, 5, 6, 7)), ("NHWC", (4, 7, 7, 256)),
                ("NC", (37, 9)), ("NCL", (5, 3, 33)), ("NCHW", (8, 4, 1, 3))]


@pytest.mark.parametrize("activation,residual", [("relu", True), ("relu", False), (None, True)])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("data_format,shape", FUSED_SHAPES)
def test_fused_epilogue_kernels_match_reference(data_format, shape, dtype, activation, residual):
    """The epilogue's loops of the real kernels (tests/fused_check.py; on the planned path from
    the second call)."""
    import cupy
    check_fused(data_format, shape, dtype, activation, residual, lambda a, d, role: to_device(a, d), to_host,
                device=f"gpu:{cupy.cuda.Device().id}")


@pytest.mark.parametrize("activation,residual", [("relu", True), ("relu", False), (None, True)])
@pytest.mark.parametrize("data_format,shape", [("NCHW", (8, 64, 16, 16)), ("NHWC", (4, 7, 7, 256))])
def test_fused_planned_calls_are_bitwise_those_of_the_full_path(monkeypatch, data_format, shape, activation,
                                                                 residual):
    import cupy
    from cusyncbn import _planned
    device = f"gpu:{cupy.cuda.Device().id}"

    def run():
        return check_fused(data_format, shape, "float32", activation, residual, lambda a, d, role: to_device(a, d),
                           to_host, device=device, steps=3)
    planned = run()
    monkeypatch.setattr(_planned, "enabled", False)
    _planned.clear()
    for one, other in zip(planned, run()):
        for a, b in zip(one, other):
            np.testing.assert_array_equal(a, b)


def test_gpu_matches_cpu_backend_on_odd_sizes():
    import cupy
    rng = np.random.default_rng(1)
    for shape, fmt in (((3, 13, 5, 11), "NCHW"), ((7, 3, 5, 13), "NHWC"), ((1001, 17), "NC")):
        x = rng.normal(size=shape).astype("float32")
        dy = rng.normal(size=shape).astype("float32")
        c = shape[-1] if ref.CHANNEL_LAST[fmt] else shape[1]
        cpu, gpu = (cusyncbn.SyncBatchNorm(c, data_format=fmt, device=d) for d in ("cpu", "gpu"))
        np.testing.assert_allclose(cupy.asnumpy(gpu(cupy.asarray(x))), cpu(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cupy.asnumpy(gpu.backward(cupy.asarray(dy))), cpu.backward(dy),
                                   rtol=1e-5, atol=1e-5)


def test_no_host_sync_under_graph_capture():
    """A training forward+backward can be captured in a CUDA graph: no host sync inside."""
    import cupy
    bn = cusyncbn.SyncBatchNorm(32, device="gpu")
    x = cupy.random.standard_normal((8, 32, 16, 16), dtype=cupy.float32)
    dy = cupy.random.standard_normal((8, 32, 16, 16), dtype=cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        # Warm up on the capture stream: kernels compiled, and the per-stream pools (our
        # statistics and scratch, CuPy's memory) hold what the captured calls will take.
        for _ in range(2):
            y_ref, dx_ref = bn(x), bn.backward(dy)
        stream.synchronize()
        stream.begin_capture()
        y = bn(x)
        dx = bn.backward(dy)
        graph = stream.end_capture()
        graph.launch(stream)
    stream.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(y), cupy.asnumpy(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(dx), cupy.asnumpy(dx_ref), rtol=1e-5, atol=1e-5)


def test_torch_cuda_matches_torch_batchnorm(torch_float32):
    """The batch norms alone, on the same input tensor (no convolution's rounding in between)."""
    torch = torch_float32
    import copy
    import cusyncbn.torch as cbt
    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.BatchNorm2d(8)).cuda()
    with torch.no_grad():
        for bn in (ref_model[0], ref_model[2]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    ours = cbt.convert_sync_batchnorm(copy.deepcopy(ref_model))
    x = torch.randn(6, 8, 7, 7, device="cuda") * 2 + 1
    dy = torch.randn(6, 8, 7, 7, device="cuda")          # not a constant: d(sum of BN output)/dx is 0
    outs = []
    for m in (ref_model, ours):
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y * dy).sum().backward()
        outs.append((y, xx.grad, m[0].weight.grad, m[0].bias.grad, m[0].running_var, m[2].running_mean))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith(("torch", "nccl_bootstrap"))])
def test_multi_rank_nccl(case, n):
    result = run_ranks(n, case, device="gpu")
    assert result["errors"] == [], "\n".join(result["errors"])


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("case", GPU_CASES)
def test_multi_rank_against_torch_syncbatchnorm(case, n):
    pytest.importorskip("torch")
    result = run_ranks(n, case, device="gpu")
    assert result["size"] == n
    assert result["errors"] == [], "\n".join(result["errors"])


def test_dlpack_torch_cuda_zero_copy_and_stream_order():
    """A torch CUDA tensor goes in without a copy, results come back as torch tensors, and
    work still queued on torch's (non-default) stream is ordered before our kernels: x and
    dy (random) are written there behind a long chain of matmuls, and y and dx are checked
    against the float64 reference."""
    torch = pytest.importorskip("torch")
    import cupy
    bn = cusyncbn.SyncBatchNorm(16, device="gpu", output="input")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        a = torch.randn(2048, 2048, device="cuda")
        for _ in range(20):                                   # keep the side stream busy (a ends up all +-1)
            a = torch.tanh(a @ a / 2048 ** 0.5)
        x = torch.randn(64, 16, 4, 1, device="cuda") * 2 + torch.arange(16, device="cuda").view(1, 16, 1, 1)
        y = bn(x)                                             # torch's current stream is `side` here
        dy = torch.randn(x.shape, device="cuda")
        dx = bn.backward(dy)
    side.synchronize()
    assert isinstance(y, torch.Tensor) and y.is_cuda and isinstance(dx, torch.Tensor) and dx.is_cuda
    assert get_backend(bn.device).import_array(x, "x").data.ptr == x.data_ptr()       # zero-copy
    x_host, dy_host = x.cpu().numpy(), dy.cpu().numpy()
    y_ref = ref.forward(x_host, 1, 0, 1e-5, "NCHW")[0]
    np.testing.assert_allclose(y.cpu().numpy(), y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx.cpu().numpy(), ref.backward(x_host, dy_host, 1, 1e-5, "NCHW")[0],
                               rtol=1e-4, atol=1e-4)
    c = bn(cupy.asarray(x_host))
    assert isinstance(c, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(c), y_ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="host array"):
        bn(x.cpu().numpy())


def test_torch_module_on_a_side_stream_and_in_a_cuda_graph(torch_float32):
    """cusyncbn.torch queues its kernels on torch's current stream: training on a side
    stream matches torch, and a training forward can be captured in a torch CUDA graph
    (after a torch convolution, so torch's kernels and ours share the graph)."""
    torch = torch_float32
    import copy
    import cusyncbn.torch as cbt
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).cuda()
    ours = cbt.convert_sync_batchnorm(copy.deepcopy(base))
    x = torch.randn(8, 3, 16, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):                                       # also warms up kernels and pools
            for m in (base, ours):
                m.zero_grad()
                m(x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(ours[1].running_var, base[1].running_var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1].weight.grad, base[1].weight.grad, rtol=1e-4, atol=1e-4)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):              # the warmed-up stream: our pools are there
        static_y = ours(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = base[1](base[0](static_x))                     # training mode: batch statistics
    torch.testing.assert_close(static_y, expected, rtol=1e-4, atol=1e-4)


def test_planned_calls_match_the_rawkernel_path_and_report_through_mapped_slots():
    """The planned path on the hardware: pre-packed cuLaunchKernel launches give the bits of
    RawKernel.__call__ launches; a NaN's report reaches the host through the mapped slot."""
    import cupy
    from cusyncbn import _planned
    from cusyncbn.functional import flush_reports
    backend = get_backend(f"gpu:{cupy.cuda.Device().id}")
    rng = np.random.default_rng(7)
    xs = [cupy.asarray(rng.normal(1.0, 2.0, size=(6, 12, 7, 5)).astype("float32")) for _ in range(3)]
    dys = [cupy.asarray(rng.normal(size=(6, 12, 7, 5)).astype("float32")) for _ in range(3)]

    def steps():
        bn = cusyncbn.SyncBatchNorm(12, device=backend.device)
        out = [(bn(x).get(), bn.backward(dy).get()) for x, dy in zip(xs, dys)]
        return out, [a.get() for a in (bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)]

    planned = steps()
    backend.set_launch_mode("call")
    try:
        _planned.clear()
        called = steps()
    finally:
        backend.set_launch_mode("packed")
    for (y, dx), (y2, dx2) in zip(planned[0], called[0]):
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(dx, dx2)
    for a, b in zip(planned[1], called[1]):
        np.testing.assert_array_equal(a, b)
    bn = cusyncbn.SyncBatchNorm(12, device=backend.device, name="nan_layer")
    for _ in range(2):
        bn.backward(bn(xs[0]))
    bad = xs[0].copy()
    bad[0, 3, 0, 0] = cupy.nan
    bn.backward(bn(bad))                                     # planned: its report goes to a slot
    with pytest.warns(RuntimeWarning, match="nan_layer"):
        flush_reports()


@pytest.mark.parametrize("case", ["skip_step", "stuck"])
def test_a_stuck_nccl_collective_ends_the_job(case):
    """The watchdog on NCCL (2 ranks sharing the GPU): a rank one step short ends the job at
    once through its early-exit notice, a rank stuck in user code at the timeout (5 s)."""
    import os
    from test_failures import HERE, launch
    script = os.path.join(HERE, "failure_scripts", "stuck_rank.py")
    output, status, seconds = launch(f"{case}:gpu", "python", 2, (("CUSYNCBN_TIMEOUT", "5"),), script)
    assert status != 0 and seconds < 5 + 15, (status, seconds, output[-3000:])
    if case == "skip_step":
        assert "rank 1 finished after collective 11" in output and "collective 12 (bn3, forward)" in output, output
    else:
        assert "has waited 2." in output and "did not complete within the timeout of 5 s" in output, output
        assert "collective 6 (bn3, forward)" in output, output


NCCL_EXAMPLE = """
import doctest
import cusyncbn
text = cusyncbn.NCCLComm.__doc__.replace("# doctest: +SKIP", "")
test = doctest.DocTestParser().get_doctest(text, {"cusyncbn": cusyncbn}, "NCCLComm", None, 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
runner.run(test)
print(runner.summarize(verbose=False))
"""


def test_nccl_docstring_example_runs():
    """``NCCLComm``'s example (skipped by the CPU doctests) run as written, in a process of its
    own: the communicator installs the job's abort hooks."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", NCCL_EXAMPLE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "TestResults(failed=0, attempted=2)" in done.stdout, done.stdout + done.stderr
