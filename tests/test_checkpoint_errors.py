"""Checkpoint files that cannot be loaded: every error names the file and what is wrong."""
import numpy as np
import pytest

import cusyncbn


@pytest.fixture
def bn():
    return cusyncbn.SyncBatchNorm(3, device="cpu")


@pytest.fixture
def saved(tmp_path, bn):
    path = tmp_path / "bn.npz"
    cusyncbn.save_checkpoint(bn, path)
    return path


def write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda saved: write(saved, saved.read_bytes()[:200]), "is truncated or corrupt"),
    (lambda saved: write(saved, b""), "is empty"),
    (lambda saved: write(saved, b"weight,bias\n1,2\n"), "is not an .npz file"),
    (lambda saved: np.save(saved.with_suffix(".npy"), np.zeros(3)) or saved.with_suffix(".npy"),
     "holds a single .npy array"),
])
def test_file_that_is_not_a_checkpoint(bn, saved, make, words):
    path = make(saved)
    with pytest.raises(ValueError) as info:
        cusyncbn.load_checkpoint(bn, path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_unreadable_entry(bn, saved):
    data = bytearray(saved.read_bytes())
    start = data.index(b"\x93NUMPY", data.index(b"_mean.npy"))
    data[start + 1:start + 6] = b"XXXXX"                    # the entry's .npy header, not the zip's
    path = write(saved, bytes(data))
    with pytest.raises(ValueError, match=r"entry '_mean' of .*bn\.npz is unreadable"):
        cusyncbn.load_checkpoint(bn, path)
    np.savez(path, weight=np.array([None] * 3, dtype=object))
    with pytest.raises(ValueError, match=r"entry 'weight' of .*bn\.npz is unreadable \(Object arrays"):
        cusyncbn.load_checkpoint(bn, path)


def test_entries_of_another_model_or_layout(bn, tmp_path, saved):
    other = tmp_path / "other.npz"
    np.savez(other, **{"conv1.weight": np.ones(3)})
    with pytest.raises(KeyError, match=r"unexpected keys \['conv1.weight'\] in .*other\.npz"):
        cusyncbn.load_checkpoint(bn, other)
    with pytest.raises(KeyError, match=r"bn\.npz holds a single layer, not the layers \['a'\]"):
        cusyncbn.load_checkpoint({"a": bn}, saved)
    cusyncbn.save_checkpoint({"a": bn, "b": bn}, saved)
    with pytest.raises(KeyError, match=r"bn\.npz holds the layers \['a', 'b'\], not a single layer"):
        cusyncbn.load_checkpoint(bn, saved)


def test_nonfinite_values_raise_unless_allowed(bn, tmp_path):
    path = tmp_path / "nan.npz"
    np.savez(path, weight=np.ones(3), bias=np.zeros(3), _mean=np.array([0.0, np.nan, 0.0]), _variance=np.ones(3))
    with pytest.raises(ValueError, match=r"nan\.npz\['_mean'\] holds NaN or Inf \(pass allow_nonfinite=True"):
        cusyncbn.load_checkpoint(bn, path)
    np.testing.assert_array_equal(bn.running_mean, 0.0)            # unchanged by the failed load
    cusyncbn.load_checkpoint(bn, path, allow_nonfinite=True)
    assert np.isnan(bn.running_mean[1])


def test_saving_into_a_missing_directory_names_the_path(bn, tmp_path):
    path = tmp_path / "no" / "such" / "bn.npz"
    with pytest.raises(FileNotFoundError) as info:
        cusyncbn.save_checkpoint(bn, path)
    assert f"cannot write {str(path)!r}: no such directory" in str(info.value)
    assert ".tmp" not in str(info.value)
    assert not (tmp_path / "no").exists()


def test_a_pytorch_dict_that_does_not_fit_is_named_by_its_own_keys():
    """Issue 17: the message named the layer's internal key (_mean) for PyTorch's running_mean."""
    import cusyncbn
    bn = cusyncbn.SyncBatchNorm(4, device="cpu")
    state = {"weight": np.ones(4), "bias": np.zeros(4), "running_mean": np.zeros(3), "running_var": np.ones(4)}
    with pytest.raises(ValueError, match=r"state\['running_mean'\] has shape \(3,\)") as raised:
        cusyncbn.load_state_dict(bn, state)
    assert "'_mean'" not in str(raised.value)
    np.testing.assert_array_equal(bn.running_mean, np.zeros(4))
    del state["running_var"]
    with pytest.raises(KeyError, match=r"missing keys \['running_var'\]"):
        cusyncbn.load_state_dict(bn, {**state, "running_mean": np.zeros(4)})
