"""Walking a model to replace some of its layers (``convert_sync_batchnorm``).

As Paddle's converter walks ``named_children()``, this walks a model's children only:
the sublayers of an object with ``named_children()`` (Paddle / PyTorch style
containers), the items of lists, tuples and dicts, and the attributes of plain objects
that are layers or such containers. Other attribute values (optimizers, data sets,
arrays, arbitrary objects) are never entered.
"""
from __future__ import annotations

from typing import Any, Callable


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (list, tuple, dict)) or hasattr(obj, "named_children")


def walk(obj: Any, replace: Callable[[Any], Any], is_layer: Callable[[Any], bool], memo: dict | None = None) -> Any:
    """``obj`` with every layer ``l`` found among its children replaced by ``replace(l)``.

    Lists and dicts are changed in place, tuples rebuilt (named tuples keep their type);
    a shared layer is converted once.
    """
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if is_layer(obj):
        memo[id(obj)] = new = replace(obj)
        return new
    memo[id(obj)] = obj
    if isinstance(obj, list):
        obj[:] = [walk(v, replace, is_layer, memo) for v in obj]
    elif isinstance(obj, tuple):
        items = tuple(walk(v, replace, is_layer, memo) for v in obj)
        obj = type(obj)(*items) if hasattr(obj, "_fields") else items
        memo[id(obj)] = obj
    elif isinstance(obj, dict):
        for key in list(obj):
            obj[key] = walk(obj[key], replace, is_layer, memo)
    elif hasattr(obj, "named_children"):
        for key, child in list(obj.named_children()):
            new = walk(child, replace, is_layer, memo)
            if new is not child:
                setattr(obj, key, new)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for key, value in list(vars(obj).items()):
            if is_layer(value) or _is_container(value):
                new = walk(value, replace, is_layer, memo)
                if new is not value:
                    setattr(obj, key, new)
    return obj
