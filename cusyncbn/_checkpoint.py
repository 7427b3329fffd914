"""Checkpoints: state dicts in cusyncbn's, PyTorch's and Paddle's naming, and .npz files.

cusyncbn (and Paddle) name the entries ``weight``, ``bias``, ``_mean``, ``_variance``;
PyTorch names them ``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``.

State dicts and checkpoints hold a layer's state, never its settings (momentum, epsilon,
data format, the fused epilogue's ``act``...), as in Paddle and PyTorch: a layer built with
other settings loads them, and keeps its own settings.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
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
        # Staged here rather than by set_state_dict, so that messages name the dict's own keys.
        targets = layer.state_dict()
        _state.write(targets, _state.stage(targets, state, strict, layer.device, layer.name,
                                           names={ours: theirs for theirs, ours in _TORCH_TO_OURS.items()}),
                     layer.device)
        return
    layer.set_state_dict(state, strict=strict)


def export_state_dict(layer: Any, format: str = "cusyncbn") -> dict:
    """Host copies of ``layer``'s state in the naming of ``format``.

    Args:
        layer: a cusyncbn batch-norm layer (its ``state_dict()``: ``weight`` and ``bias``
            when it has them, ``_mean``, ``_variance``).
        format: ``"cusyncbn"`` or ``"paddle"`` (those names), or ``"torch"`` (``weight``,
            ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``).

    Returns:
        A new dict of new host arrays, each of shape ``(num_features,)`` in the layer's
        dtype (float32 or float64): NumPy arrays, or for ``"torch"`` CPU torch tensors
        (ready for ``torch_bn.load_state_dict``) and ``num_batches_tracked``, a 0-d int64
        tensor holding 0 (cusyncbn does not count batches). Later updates of the layer do
        not show in them.

    Raises:
        ValueError: an unknown ``format``.
        ImportError: ``"torch"`` without torch installed.

    Example:
        >>> import cusyncbn
        >>> state = cusyncbn.export_state_dict(cusyncbn.SyncBatchNorm(2, device="cpu"), "torch")
        >>> sorted(state), tuple(state["running_var"].shape), state["running_var"].dtype   # doctest: +SKIP
        (['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'], (2,), torch.float32)
        >>> sorted(cusyncbn.export_state_dict(cusyncbn.SyncBatchNorm(2, device="cpu", bias_attr=False)))
        ['_mean', '_variance', 'weight']
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
    Read it back with :func:`load_checkpoint`.

    Args:
        layers: a cusyncbn batch-norm layer, or a dict ``{name: layer}``.
        path: the file to write (a ``str`` or path-like), exactly there (no ``.npz`` is
            appended); an existing file is replaced.

    The file holds, per layer, host copies of its ``state_dict()`` entries (``weight``,
    ``bias`` when present, ``_mean``, ``_variance``), each of shape ``(num_features,)`` in
    the layer's dtype, named ``"<name>/<key>"`` for a dict of layers and ``"<key>"`` for one.

    Raises:
        FileNotFoundError: ``path``'s directory does not exist.
        OSError (e.g. ``PermissionError``): the file cannot be written there. The message
            names ``path``; no temporary file is left behind and a file already at ``path``
            is unchanged.

    Example:
        >>> cusyncbn.save_checkpoint({"bn1": bn1, "bn2": bn2}, "bn.npz")     # doctest: +SKIP
    """
    named = layers if isinstance(layers, dict) else {"": layers}
    arrays = {}
    for prefix, layer in named.items():
        for key, value in layer.state_dict().items():
            arrays[f"{prefix}/{key}" if prefix else key] = np.array(to_host(value), copy=True)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cusyncbn-", suffix=".npz.tmp", dir=directory)
    except OSError as exc:                  # it would name the temporary file, not the user's path
        why = "no such directory" if isinstance(exc, FileNotFoundError) else exc.strerror
        raise type(exc)(exc.errno, f"save_checkpoint cannot write {path!r}: {why} ({directory!r}; the checkpoint "
                        "is written there under a temporary name first)") from None
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

    Args:
        layers: the layer, or the dict of named layers, given to ``save_checkpoint``.
        path: the ``.npz`` file.
        strict: every entry of every layer must be in the file.
        allow_nonfinite: load NaN or Inf values instead of raising.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint (empty, not an ``.npz``, truncated or
            corrupt), an entry is unreadable or has the wrong shape, or holds NaN or Inf.
        KeyError: the file's entries do not match the layers' (unknown or missing ones).
        TypeError: an entry is not floating point.

    Example:
        >>> cusyncbn.load_checkpoint({"bn1": bn1, "bn2": bn2}, "bn.npz")     # doctest: +SKIP
    """
    named = layers if isinstance(layers, dict) else {"": layers}
    path = os.fspath(path)
    saved: dict[str, dict] = {}
    for key, value in _read_npz(path).items():
        prefix, _, entry = key.rpartition("/")
        saved.setdefault(prefix, {})[entry] = value
    if set(saved) - set(named):
        def layers(names: list) -> str:
            return "a single layer" if names == [""] else f"the layers {names}"
        raise KeyError(f"load_checkpoint: {path} holds {layers(sorted(saved))}, not {layers(list(named))}; load "
                       "a dict of layers under the names it was saved with, or a single layer's file into a single "
                       "layer")
    staged = {name: _state.stage(layer.state_dict(), saved.get(name, {}), strict, layer.device, layer.name,
                                 allow_nonfinite, source=path)
              for name, layer in named.items()}
    for name, layer in named.items():                   # written only once every layer fits
        _state.write(layer.state_dict(), staged[name], layer.device)


_NPY_MAGIC = b"\x93NUMPY"


def _read_npz(path: str) -> dict:
    """The arrays of an ``.npz`` file; an error names the file and what is wrong with it."""
    with open(path, "rb") as f:                 # FileNotFoundError & co. name the path themselves
        head = f.read(len(_NPY_MAGIC))
    if not head.startswith(b"PK"):              # every zip file (.npz) starts so
        what = ("is empty" if not head else "holds a single .npy array" if head == _NPY_MAGIC
                else "is not an .npz file")
        raise ValueError(f"load_checkpoint: {path} {what}, not a checkpoint written by cusyncbn.save_checkpoint")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"load_checkpoint: {path} is truncated or corrupt ({exc})") from exc
    arrays = {}
    with data:
        for key in data.files:
            try:
                arrays[key] = data[key]
            except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
                raise ValueError(f"load_checkpoint: entry {key!r} of {path} is unreadable ({exc})") from exc
            if not isinstance(arrays[key], np.ndarray):
                raise ValueError(f"load_checkpoint: entry {key!r} of {path} is not a NumPy array")
    return arrays
