"""Loading per-channel state (parameters, running statistics) into a layer, all or nothing.

A layer's ``state_dict()`` is a mapping of names to its live arrays; loading first
checks every entry (known key, shape ``(C,)``, a floating dtype, finite values unless
allowed) and converts it to the layer's device, then writes them all. Used by
``set_state_dict`` and by the checkpoint functions, which stage several layers before
writing any.
"""
from __future__ import annotations

import numpy as np

from ._backend_factory import get_backend
from ._dlpack import to_host
from ._rules import is_float


def stage(targets: dict, state: dict, strict: bool, device: str, where: str, allow_nonfinite: bool = False,
          source: str = "state", names: dict | None = None) -> dict:
    """Check every entry of ``state`` against ``targets`` (a ``state_dict()``) and return the
    entries as arrays of ``device``. Nothing is written. ``names`` maps the layer's keys to
    the ones the caller's dict used (e.g. PyTorch's), for the messages.

    Raises:
        KeyError: an unknown key, or (``strict``) a key of ``targets`` missing.
        ValueError: a shape that does not fit, or non-finite values (unless allowed).
        TypeError: a dtype that is not floating.
    """
    backend = get_backend(device)
    shown = (lambda k: k) if names is None else (lambda k: names.get(k, k))
    unknown = sorted(map(shown, set(state) - set(targets)))
    missing = sorted(map(shown, set(targets) - set(state)))
    if unknown:
        raise KeyError(f"{where}: unexpected keys {unknown} in {source}; the layer has {list(map(shown, targets))}")
    if strict and missing:
        raise KeyError(f"{where}: missing keys {missing} in {source} (pass strict=False to load a subset)")
    staged = {}
    for key, value in state.items():
        label = shown(key)
        # Checkpoints usually come from the host: copying them to the layer's device is the point.
        if backend.is_native(value):
            arr = value
        else:
            with backend.scope():
                arr = backend.xp.asarray(to_host(value))
        expected = tuple(targets[key].shape)
        if tuple(arr.shape) != expected:
            raise ValueError(f"{where}: {source}[{label!r}] has shape {tuple(arr.shape)}, expected shape "
                             f"{expected}")
        if not is_float(arr.dtype):
            raise TypeError(f"{where}: {source}[{label!r}] has dtype {arr.dtype}, expected a floating dtype")
        if not allow_nonfinite and not bool(np.isfinite(np.asarray(to_host(arr), dtype=np.float64)).all()):
            raise ValueError(f"{where}: {source}[{label!r}] holds NaN or Inf (pass allow_nonfinite=True to load "
                             "it anyway)")
        staged[key] = arr
    return staged


def write(targets: dict, staged: dict, device: str) -> None:
    """Copy the staged arrays into the live ones, in place, cast to their dtype."""
    with get_backend(device).scope():
        for key, arr in staged.items():
            targets[key][...] = arr.astype(targets[key].dtype)
