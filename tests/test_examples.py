"""Smoke tests: every example and the README's snippets run as their headers say and report
success, and none builds its layer on a device other than where its data lives."""
import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import reference as ref
from test_mpi import mpiexec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
LAYERS = {"SyncBatchNorm", "BatchNorm1D", "BatchNorm2D", "BatchNorm3D"}
# Array packages by the first word of an imported package or of a name (np, jnp, jax_array...).
PACKAGES = {"numpy": "numpy", "np": "numpy", "jax": "jax", "jnp": "jax", "cupy": "cupy", "cp": "cupy",
            "torch": "torch"}


def run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def readme_blocks():
    """(line number, source) of every python block of README.md."""
    text = open(os.path.join(ROOT, "README.md")).read()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)]


def readme_block(containing):
    found = [source for _, source in readme_blocks() if containing in source]
    assert len(found) == 1, f"{len(found)} README python blocks contain {containing!r}"
    return found[0]


def device_problems(source, where, first_line=1):
    """Layers of ``source`` built on a device that contradicts where its data lives.

    A layer's ``device=`` is a constant ("cpu", "gpu..."), absent (the default device: the
    GPU wherever CuPy sees one, else the CPU), or derived (any other expression, e.g.
    ``cusyncbn.device_of(x)``). Its data is that of the array packages ``source`` imports:
    NumPy arrays are on the host, JAX's on JAX's default device (a GPU wherever JAX has
    one), CuPy's on a GPU; the packages are those ``source`` imports or names (``jax_array``
    counts as JAX data). A default device is fine for CuPy data, or where ``source``
    chooses it itself (``cusyncbn.set_device`` / ``get_device``) and places its data by it.
    """
    tree = ast.parse(source)
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            words |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            words.add(node.module.split(".")[0])
        elif isinstance(node, ast.Name):
            words.add(node.id.split("_")[0])
    data = {PACKAGES[w] for w in words if w in PACKAGES}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]

    def name(call):
        func = call.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "cusyncbn":
            return func.attr
        return func.id if isinstance(func, ast.Name) else None
    chooses_default = any(name(call) in ("set_device", "get_device") for call in calls)
    problems = []
    for call in calls:
        if name(call) not in LAYERS:
            continue
        device = next((k.value for k in call.keywords if k.arg == "device"), ast.Constant(None))
        at = f"{where}:{first_line + call.lineno - 1}: {name(call)}"
        if not isinstance(device, ast.Constant):
            continue                                             # derived from the data or the arguments
        if device.value is None:
            if not (chooses_default or data <= {"cupy"}):
                problems.append(f"{at} on the default device (the GPU wherever CuPy sees one) for "
                                f"{'/'.join(sorted(data))} data: pass device=\"cpu\" or cusyncbn.device_of(x)")
        elif device.value == "cpu":
            if data & {"jax", "cupy"}:
                problems.append(f"{at} on the CPU for {'/'.join(sorted(data & {'jax', 'cupy'}))} data, which may "
                                "live on a GPU: pass device=cusyncbn.device_of(x)")
        elif not data & {"cupy", "torch", "jax"}:
            problems.append(f"{at} on {device.value} for host ({'/'.join(sorted(data))}) data")
    return problems


def test_readme_python_blocks_parse():
    blocks = readme_blocks()
    assert len(blocks) >= 4
    for line, source in blocks:
        ast.parse(source, f"README.md:{line}")


def test_examples_and_readme_build_layers_where_their_data_lives():
    problems = []
    for line, source in readme_blocks():
        problems += device_problems(source, "README.md", line)
    for example in EXAMPLES:
        problems += device_problems(open(os.path.join(ROOT, "examples", example)).read(), example)
    assert problems == []


@pytest.mark.parametrize("source,problem", [
    # examples/jax_dlpack.py before the H200 run showed it: a CPU layer, JAX data on the GPU.
    ('import jax.numpy as jnp, numpy as np, cusyncbn\nx = jnp.asarray(np.ones((4, 3)))\n'
     'bn = cusyncbn.SyncBatchNorm(3, device="cpu", dtype="float64", output="input")\n', "on the CPU for jax data"),
    # the README's NumPy usage before: the default device, a GPU wherever CuPy sees one.
    ('import numpy as np, cusyncbn\nbn = cusyncbn.SyncBatchNorm(16, data_format="NCHW")\n',
     "default device (the GPU wherever CuPy sees one) for numpy data"),
    # the README's JAX snippet before (no import: the data is named jax_array).
    ('bn = cusyncbn.SyncBatchNorm(3, output="input")\ny = bn(jax_array); dx = bn.backward(jax_dy)\n',
     "default device (the GPU wherever CuPy sees one) for jax data"),
    ('import cupy, cusyncbn\nbn = cusyncbn.BatchNorm2D(3, device="cpu")\n', "on the CPU for cupy data"),
    ('import numpy as np\nfrom cusyncbn import SyncBatchNorm\nbn = SyncBatchNorm(3, device="gpu:0")\n',
     "on gpu:0 for host (numpy) data"),
    ('import numpy as np, cusyncbn\nbn = cusyncbn.SyncBatchNorm(3, device="cpu")\n', None),
    ('import jax.numpy as jnp, cusyncbn\nx = jnp.ones((2, 3))\n'
     'bn = cusyncbn.SyncBatchNorm(3, device=cusyncbn.device_of(x))\n', None),
    ('import cupy, cusyncbn\nbn = cusyncbn.SyncBatchNorm(3)\n', None),
    ('import numpy as np, cusyncbn\nxp = np if cusyncbn.get_device() == "cpu" else None\n'
     'bn = cusyncbn.SyncBatchNorm(3)\n', None),
])
def test_device_check_can_fail(source, problem):
    found = device_problems(source, "snippet")
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and problem in found[0], found


@pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_readme_usage_runs(n, tmp_path):
    demo = tmp_path / "demo.py"
    demo.write_text(readme_block("# mpiexec -n 2 python demo.py"))
    proc = run([sys.executable, str(demo)] if n == 1 else [mpiexec(), "-n", str(n), sys.executable, str(demo)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(re.findall(rf"rank \d/{n}: global batch mean of channel 0 [-+][0-9.]+ -> OK", proc.stdout)) == n, \
        proc.stdout


def test_readme_jax_snippet_runs():
    pytest.importorskip("jax")
    scope = {}
    exec(readme_block("import jax.numpy as jnp"), scope)
    x, y, dx = (np.asarray(scope[k], np.float64) for k in ("x", "y", "dx"))
    assert type(scope["y"]).__module__.startswith("jax") and type(scope["dx"]).__module__.startswith("jax")
    np.testing.assert_allclose(y, ref.forward(x, 1, 0, 1e-5, "NCL")[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, ref.backward(x, np.cos(x), 1, 1e-5, "NCL")[0], rtol=1e-4, atol=1e-4)


def test_readme_functional_snippet_says_it_worked(capsys):
    exec(readme_block("from cusyncbn.functional import sync_batch_norm, sync_batch_norm_backward"), {})
    assert capsys.readouterr().out.strip().endswith(": OK")


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_train_mpi(n):
    proc = run([mpiexec(), "-n", str(n), sys.executable, "examples/train_mpi.py", "--steps", "20", "--device", "cpu"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-> OK" in proc.stdout and f"{n} rank(s) on cpu" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_jax_dlpack(n):
    pytest.importorskip("jax")
    proc = run([mpiexec(), "-n", str(n), sys.executable, "examples/jax_dlpack.py"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("-> OK") == n


@pytest.mark.slow
def test_torch_convert():
    pytest.importorskip("torch")
    proc = run([mpiexec(), "-n", "2", sys.executable, "examples/torch_convert.py", "--steps", "10"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": OK" in proc.stdout
