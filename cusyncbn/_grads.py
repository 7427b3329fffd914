"""Summing parameter gradients over ranks, for data-parallel training loops.

``cusyncbn.allreduce_gradients`` is an entry point of the shell floor, beside ``_layer.py``:
it reduces arrays and :class:`Parameter` objects itself and hands torch tensors to the torch
adapter (``cusyncbn.torch``, a shell too), which imports nothing from here."""
from __future__ import annotations

from typing import Any, Iterable

from ._backend_factory import get_backend
from ._comm_factory import resolve_comm
from ._params import Parameter


def allreduce_gradients(params: Iterable[Any], comm: Any = None, op: str = "sum") -> None:
    """All-reduce gradients in place with one collective.

    SyncBatchNorm's backward leaves this rank's partial sums in ``weight.grad`` and
    ``bias.grad``; with ``op="sum"`` this turns them (and any other layer's partial
    gradients of a global loss) into the full gradient on every rank. Use
    ``op="mean"`` when each rank's loss is a mean over its own batch, as in the usual
    data-parallel recipe.

    Args:
        params: :class:`Parameter` objects (those whose ``grad`` is None are skipped) or
            plain arrays, all on one device (NumPy or CuPy); or torch tensors, e.g. a torch
            model's ``parameters()``, whose ``.grad`` are reduced (see
            :func:`cusyncbn.torch.allreduce_gradients`).
        comm: as for :class:`SyncBatchNorm` (None: the default communicator).
        op: ``"sum"`` or ``"mean"`` (divides by the communicator's size).

    Raises:
        ValueError: unknown ``op``.

    Example:
        >>> cusyncbn.allreduce_gradients(bn.parameters() + [w1, w2])   # doctest: +SKIP
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
    params = list(params)
    if any(_is_torch_tensor(p) for p in params):
        from .torch import allreduce_gradients as torch_allreduce      # torch is imported already
        torch_allreduce(params, comm, op)
        return
    arrays = []
    for p in params:
        g = p.grad if isinstance(p, Parameter) else p
        if g is not None:
            arrays.append(g)
    if not arrays:
        return
    xp = _array_module(arrays[0])
    device = "cpu" if xp.__name__ == "numpy" else f"gpu:{arrays[0].device.id}"
    comm = resolve_comm(comm, device)
    with get_backend(device).scope():                  # results on the gradients' device
        flat = xp.concatenate([a.reshape(-1).astype(xp.float64) for a in arrays])
        comm.allreduce(flat)
        if op == "mean":
            flat /= comm.size
        offset = 0
        for a in arrays:
            a[...] = flat[offset:offset + a.size].reshape(a.shape).astype(a.dtype)
            offset += a.size


def _is_torch_tensor(p: Any) -> bool:
    return type(p).__module__.split(".")[0] == "torch" and hasattr(p, "requires_grad")


def _array_module(a: Any) -> Any:
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    import numpy
    return numpy
