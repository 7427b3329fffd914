"""cusyncbn.SyncBatchNorm.convert_sync_batchnorm keeps what it replaces (issue 17, section 3):
every setting and instance attribute of a BatchNorm1D/2D/3D moves to its SyncBatchNorm, which
then behaves as the old layer did on one process (the float64 reference for the values);
what cannot move (a subclass's own methods) is named in a warning. The Paddle adapter's
converter is tested in tests/test_paddle_dropin.py."""
import copy
import warnings

import numpy as np
import pytest

import cusyncbn
import reference as ref
from comms import CountingComm

EPS = 1e-5


def test_frozen_layer_keeps_use_global_stats():
    """The issue's input: BatchNorm1D(1, use_global_stats=True) with running statistics 0 / 1,
    converted, then one training forward of x = [[0], [2]]: normalized with the running
    statistics, y = x / sqrt(1 + eps) = [0, 1.99999], running_mean still 0 (it gave y = [-1, 1]
    and running_mean 0.1: the converter dropped use_global_stats)."""
    old = cusyncbn.BatchNorm1D(1, use_global_stats=True, device="cpu", data_format="NC")
    comm = CountingComm()
    bn = cusyncbn.SyncBatchNorm.convert_sync_batchnorm(old, comm=comm)
    x = np.array([[0.0], [2.0]], np.float32)
    y = bn(x)
    np.testing.assert_allclose(y.ravel(), ref.eval_forward(x, 1.0, 0.0, 0.0, 1.0, EPS, "NC").ravel(), rtol=1e-7)
    np.testing.assert_allclose(y.ravel(), [0.0, 1.99999], rtol=1e-6)
    assert bn.running_mean[0] == 0.0 and bn.running_var[0] == 1.0 and comm.calls == 0
    assert bn._use_global_stats is True


def test_sync_layer_takes_use_global_stats():
    comm = CountingComm()
    frozen = cusyncbn.SyncBatchNorm(3, device="cpu", comm=comm, use_global_stats=True, data_format="NC")
    batch = cusyncbn.SyncBatchNorm(3, device="cpu", comm=comm, use_global_stats=False, data_format="NC").eval()
    x = np.random.default_rng(0).normal(3, 2, size=(5, 3))
    np.testing.assert_allclose(frozen(x.astype("float32")), ref.eval_forward(x, 1, 0, 0, 1, EPS, "NC"), rtol=1e-5)
    assert comm.calls == 0                            # the running statistics: no collective
    np.testing.assert_allclose(batch(x.astype("float32")), ref.forward(x, 1, 0, EPS, "NC")[0], rtol=1e-5, atol=1e-5)
    assert comm.calls >= 1                            # the batch's, in eval too (Paddle's rule): synchronized
    with pytest.raises(TypeError, match="use_global_stats"):
        cusyncbn.SyncBatchNorm(3, device="cpu", use_global_stats=1)


LAYERS = [(cusyncbn.BatchNorm1D, "NLC", (6, 4, 3)), (cusyncbn.BatchNorm2D, "NHWC", (3, 2, 4, 3)),
          (cusyncbn.BatchNorm3D, "NCDHW", (2, 3, 2, 3, 2))]


def _non_default(cls, data_format, use_global_stats):
    bn = cls(3, momentum=0.6, epsilon=1e-3, weight_attr=cusyncbn.ParamAttr(learning_rate=0.5),
             bias_attr=cusyncbn.ParamAttr(trainable=False), data_format=data_format, use_global_stats=use_global_stats,
             name=f"{cls.__name__}_x", dtype="float64", unbiased_running_var=True, debug=True, device="cpu",
             output="input", nonfinite="raise", act="relu")
    rng = np.random.default_rng(1)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, 3)
    bn.bias.data[...] = rng.normal(size=3)
    bn._mean[...] = rng.normal(size=3)
    bn._variance[...] = rng.uniform(0.5, 2.0, 3)
    bn.note = "set by the user"
    bn.max_pending = 3
    return bn


@pytest.mark.parametrize("use_global_stats", [None, True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cls,data_format,shape", LAYERS, ids=[c.__name__ for c, _, _ in LAYERS])
def test_every_setting_and_attribute_carried_and_same_behaviour(cls, data_format, shape, use_global_stats, training):
    old = _non_default(cls, data_format, use_global_stats)
    old.train() if training else old.eval()
    twin = copy.deepcopy(old)                         # stays a local layer: what the new one must do
    comm = CountingComm()
    new = cusyncbn.SyncBatchNorm.convert_sync_batchnorm(old, comm=comm)
    assert type(new) is cusyncbn.SyncBatchNorm
    for key, value in vars(old).items():
        if key not in ("_comm", "_comm_arg"):
            assert vars(new)[key] is value or (isinstance(value, (list, dict, set)) and vars(new)[key] == value), key
    assert new.comm is comm
    assert (new.momentum, new.epsilon, new.data_format, new.name, new.training, new._use_global_stats, new._dtype,
            new._unbiased, new._debug, new._output, new._nonfinite, new.note, new.max_pending, new.act) == \
        (0.6, 1e-3, data_format, f"{cls.__name__}_x", training, use_global_stats, np.float64, True, True, "input",
         "raise", "set by the user", 3, "relu")
    assert new.weight is old.weight and new.bias is old.bias and not new.bias.trainable
    assert new.weight.learning_rate == 0.5 and new._mean is old._mean
    rng = np.random.default_rng(2)
    for _ in range(2):
        x, dy, r = rng.normal(1, 2, size=shape), rng.normal(size=shape), rng.normal(size=shape)
        for m in (new, twin):
            m.clear_gradients()
        # act="relu" came along: the fused epilogue, with a residual.
        outs = [(m(x, r), *m.backward(dy), m.weight.grad.copy(), m._mean.copy(), m._variance.copy())
                for m in (new, twin)]
        assert (outs[0][0] >= 0).all() and (outs[0][0] == 0).any()
        for got, want in zip(*outs):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    batch = training if use_global_stats is None else not use_global_stats
    assert (comm.calls > 0) == batch
    if batch:
        with pytest.raises(FloatingPointError):      # nonfinite="raise" came along
            new(np.full(shape, np.nan))


def test_pending_forward_and_frozen_parameters_carried():
    old = cusyncbn.BatchNorm2D(3, device="cpu", weight_attr=False, bias_attr=False)
    x = np.random.default_rng(3).normal(size=(4, 3, 2, 2))
    old(x)                                           # waits for its backward
    new = cusyncbn.SyncBatchNorm.convert_sync_batchnorm([old])[0]
    assert new.weight is None and new.bias is None and new.parameters() == []
    dy = np.random.default_rng(4).normal(size=x.shape)
    np.testing.assert_allclose(new.backward(dy), ref.backward(x, dy, 1.0, EPS, "NCHW")[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no pending forward"):
        new.backward(dy)


def test_subclass_members_named_in_a_warning_at_the_users_line():
    class Doubling(cusyncbn.BatchNorm2D):
        scale = 2.0

        def forward(self, x, *, output=None):
            return super().forward(x, output=output) * self.scale

    class Configured(cusyncbn.BatchNorm2D):
        def __init__(self, c):
            super().__init__(c, momentum=0.5, device="cpu")

    with pytest.warns(UserWarning, match=r"Doubling, a subclass of cusyncbn.BatchNorm2D that defines forward, scale")\
            as record:
        model = cusyncbn.SyncBatchNorm.convert_sync_batchnorm({"bn": Doubling(3, device="cpu")})
    assert record[0].filename == __file__ and type(model["bn"]) is cusyncbn.SyncBatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # what __init__ set up is instance state: carried
        converted = cusyncbn.SyncBatchNorm.convert_sync_batchnorm([Configured(3), cusyncbn.BatchNorm1D(3, device="cpu")])
    assert converted[0].momentum == 0.5


def test_sync_layers_left_as_they_are_with_a_warning_when_comm_differs():
    comm, other = CountingComm(), CountingComm()
    bn = cusyncbn.SyncBatchNorm(3, device="cpu", comm=comm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cusyncbn.SyncBatchNorm.convert_sync_batchnorm(bn) is bn
        assert cusyncbn.SyncBatchNorm.convert_sync_batchnorm(bn, comm=comm) is bn
    with pytest.warns(UserWarning, match="keeps its own communicator"):
        assert cusyncbn.SyncBatchNorm.convert_sync_batchnorm([bn], comm=other)[0] is bn
    assert bn.comm is comm
