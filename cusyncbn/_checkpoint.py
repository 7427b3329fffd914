"""Checkpoints: state dicts in cusyncbn's, PyTorch's and Paddle's naming, and .npz files.

cusyncbn (and Paddle) name the entries ``weight``, ``bias``, ``_mean``, ``_variance``;
PyTorch names them ``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from . import _state
from ._dlpack import to_host

_TORCH_TO_OURS = {"weight": "weight", "bias": "bias", "running_mean": "_mean", "running_var": "_variance"}
_FORMATS = ("cusyncbn", "paddle", "torch")


def _detect(state: dict) -> str:
    keys = set(state)
    if keys & {"running_mean", "running_var", "num_batches_tracked"}:
        return "torch"
    return "paddle"


def load_state_dict(layer: Any, state: dict, format: str = "auto", strict: bool = True) -> None:
    """Load a batch-norm state dict, in cusyncbn/Paddle or PyTorch naming, into ``layer``.

    Nothing is written unless every entry fits (same checks as ``set_state_dict``).

    Args:
        layer: a cusyncbn batch-norm layer.
        state: mapping of names to arrays or tensors (NumPy, CuPy, torch, Paddle...).
        format: ``"torch"``, ``"paddle"`` / ``"cusyncbn"``, or ``"auto"`` (by the key names).
        strict: every entry of the layer must be present.

    Raises:
        ValueError: unknown format. KeyError / ValueError / TypeError: entries that do not fit.

    Example:
        >>> cusyncbn.load_state_dict(bn, torch_bn.state_dict())           # doctest: +SKIP
    """
    format = _detect(state) if format == "auto" else format
    if format not in _FORMATS:
        raise ValueError(f"format must be 'auto' or one of {_FORMATS}, got {format!r}")
    if format == "torch":
        unknown = sorted(set(state) - set(_TORCH_TO_OURS) - {"num_batches_tracked"})
        if unknown:
            raise KeyError(f"load_state_dict: unexpected PyTorch keys {unknown}")
        state = {_TORCH_TO_OURS[k]: v for k, v in state.items() if k in _TORCH_TO_OURS}
    layer.set_state_dict(state, strict=strict)


def export_state_dict(layer: Any, format: str = "cusyncbn") -> dict:
    """Host copies of ``layer``'s state in the naming of ``format``.

    For ``"torch"`` the values are torch tensors (ready for ``torch_bn.load_state_dict``)
    and ``num_batches_tracked`` is included (0: cusyncbn does not count batches).
    """
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    state = {k: np.array(to_host(v), copy=True) for k, v in layer.state_dict().items()}
    if format != "torch":
        return state
    import torch
    ours_to_torch = {v: k for k, v in _TORCH_TO_OURS.items()}
    out = {ours_to_torch[k]: torch.from_numpy(v) for k, v in state.items()}
    out["num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def save_checkpoint(layers: Any, path: str | os.PathLike) -> None:
    """Write the state of one layer, or of a dict of named layers, to an ``.npz`` file, atomically.

    The file is written next to ``path`` under a temporary name, flushed to disk, then
    renamed over ``path``: a crash never leaves a truncated checkpoint where the old one was.
    """
    named = layers if isinstance(layers, dict) else {"": layers}
    arrays = {}
    for prefix, layer in named.items():
        for key, value in layer.state_dict().items():
            arrays[f"{prefix}/{key}" if prefix else key] = np.array(to_host(value), copy=True)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".cusyncbn-", suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(layers: Any, path: str | os.PathLike, strict: bool = True, *,
                    allow_nonfinite: bool = False) -> None:
    """Load a file written by :func:`save_checkpoint` into the same layer(s).

    Every layer's entries are checked before any layer is changed.
    """
    named = layers if isinstance(layers, dict) else {"": layers}
    with np.load(os.fspath(path)) as data:
        files = {k: data[k] for k in data.files}
    per_layer: dict[str, dict] = {name: {} for name in named}
    for key, value in files.items():
        prefix, _, entry = key.rpartition("/")
        if prefix not in per_layer:
            raise KeyError(f"load_checkpoint: {path} has entries for layer {prefix!r}, not among {list(named)}")
        per_layer[prefix][entry] = value
    staged = {name: _state.stage(layer.state_dict(), per_layer[name], strict, layer.device, layer.name,
                                 allow_nonfinite, source=f"{path}")
              for name, layer in named.items()}
    for name, layer in named.items():                   # written only once every layer fits
        _state.write(layer.state_dict(), staged[name])
