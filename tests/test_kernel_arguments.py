"""Kernel arguments: each kernel's built in one place (``_launch``'s builders), every parameter
given by its builder or its plan, and the names checked against what ``syncbn.cu`` declares."""
import inspect

import numpy as np
import pytest

import cuda_emu
import cusyncbn
from cusyncbn import _backend_cupy, _kernels, _launch
from layer_check import check_layer


@pytest.fixture
def emu(use_backend):
    """An emulated GPU backend serving "cpu" until the test ends."""
    return use_backend(cuda_emu.EmuBackend(sms=2))


def _placeholders(builder):
    """The builder's required keywords, each None."""
    return {name: None for name, p in inspect.signature(builder).parameters.items()
            if p.default is inspect.Parameter.empty}


@pytest.mark.parametrize("kind", _kernels.PASSES)
def test_every_parameter_comes_from_the_builder_or_the_plan(kind):
    """A pack keeps what it was last given: a parameter neither the builder nor the plan
    (A, C, B, the workspaces) writes would keep another launch's value."""
    builder = _launch.BUILDERS[kind]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in inspect.signature(builder).parameters.values())
    given = set(builder(**_placeholders(builder)))
    fixed = {"A", "C", "B", *_backend_cupy._WORK[kind]}
    params = [name for name, _ in _kernels.PARAMS[kind]]
    assert len(params) == len(set(params))
    assert given.isdisjoint(fixed), given & fixed
    assert given | fixed == set(params), set(params) ^ (given | fixed)


def test_flags_become_the_ints_the_kernel_takes():
    args = _launch.normalize_arguments(**_placeholders(_launch.normalize_arguments), unbiased=True, strict=np.True_)
    assert type(args["unbiased"]) is int and type(args["strict"]) is int and args["unbiased"] == args["strict"] == 1


def test_the_emulator_reads_the_names_syncbn_cu_declares():
    declared = cuda_emu.parameter_names(_kernels.source())
    for kind in _kernels.PASSES:
        for layout in _kernels.LAYOUTS:
            assert declared[f"{kind}_{layout}"] == tuple(name for name, _ in _kernels.PARAMS[kind])


def _swapped(params, a, b):
    params = list(params)
    i, j = [n for n, (name, _) in enumerate(params) if name in (a, b)]
    params[i], params[j] = params[j], params[i]
    return tuple(params)


def test_two_doubles_swapped_fail_the_name_check():
    """momentum and eps are both doubles: the types match either way, the names do not."""
    kernel = cuda_emu.library().kernel("normalize_cs<float, float, 1>")
    dtypes = {"T": "float32", "P": "float32", "S": "float32"}
    right = _launch.Arguments(_kernels.PARAMS["normalize"])
    kernel.check_packed(right.names, right.kinds, dtypes)
    wrong = _launch.Arguments(_swapped(_kernels.PARAMS["normalize"], "momentum", "eps"))
    assert wrong.kinds == right.kinds
    with pytest.raises(cuda_emu.EmulatedKernelError, match="argument 11 is 'eps', the kernel's parameter 11 is "
                                                           "'momentum'"):
        kernel.check_packed(wrong.names, wrong.kinds, dtypes)


@pytest.mark.parametrize("mode", ["packed", "call"])
def test_a_layer_on_swapped_parameter_names_fails(monkeypatch, emu, mode):
    """The whole path (layer -> functional core -> backend -> kernel) under both launch modes
    stops at the first launch when _kernels.PARAMS names two doubles in the wrong order."""
    monkeypatch.setitem(_kernels.PARAMS, "normalize", _swapped(_kernels.PARAMS["normalize"], "momentum", "eps"))
    emu.set_launch_mode(mode)
    bn = cusyncbn.SyncBatchNorm(3, data_format="NCL")
    with pytest.raises(cuda_emu.EmulatedKernelError, match="'eps', the kernel's parameter 11 is 'momentum'"):
        bn(cuda_emu.guarded_copy(np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)))


@pytest.mark.parametrize("mode", ["packed", "call"])
def test_the_right_names_run(emu, mode):
    emu.set_launch_mode(mode)
    check_layer("NCL", (4, 3, 5), "float32", lambda a, dtype: cuda_emu.guarded_copy(np.asarray(a).astype(dtype)),
                lambda a: np.asarray(a).astype(np.float64), device="cpu")
    assert emu.launches
