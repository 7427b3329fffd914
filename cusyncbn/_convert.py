"""Walking a model to replace some of its layers (``convert_sync_batchnorm``), and what a
replacement takes over from the layer it replaces.

As Paddle's converter walks ``named_children()``, this walks a model's children only:
the sublayers of an object with ``named_children()`` (Paddle / PyTorch style
containers), the items of lists, tuples and dicts, and the attributes of plain objects
that are layers or such containers. Other attribute values (optimizers, data sets,
arrays, arbitrary objects) are never entered.

A converter keeps what it replaces: the new layer takes over every instance attribute
of the old one (:func:`carry_state`); what lives in the old layer's *class* instead (the
methods and class attributes of a user's subclass) cannot move to an object of another
class, and :func:`warn_lost_members` says so, naming them.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Iterable

# The stacklevel of the user's line (the first frame outside cusyncbn) for a warning.
from ._stacklevel import user_stacklevel

# What every class body defines: no behaviour of the layer's own.
_CLASS_HOUSEKEEPING = frozenset({
    "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__", "__firstlineno__",
    "__static_attributes__", "__orig_bases__", "__parameters__", "__init__", "__abstractmethods__", "_abc_impl",
    "__type_params__", "__slotnames__"})


def own_members(obj: Any, base: type) -> list[str]:
    """The names that ``type(obj)``, a subclass of ``base``, defines beyond ``base`` (methods
    and class attributes of the subclass and its other bases); ``__init__`` is left out, since
    what it set up is instance state. Empty when ``obj`` is a plain ``base``."""
    return sorted({name for klass in type(obj).__mro__ if klass not in base.__mro__ for name in vars(klass)
                   if name not in _CLASS_HOUSEKEEPING})


def warn_lost_members(old: Any, base: type, who: str, label: str, base_name: str, new_name: str) -> None:
    """Warn, naming them, about the members of ``old``'s class beyond ``base`` (see
    :func:`own_members`), which its replacement (a ``new_name``) does not have; ``label``
    names the layer, ``base_name`` the class ``base`` as users write it."""
    lost = own_members(old, base)
    if lost:
        warnings.warn(f"{who}: {label} is a {type(old).__qualname__}, a subclass of {base_name} that defines "
                      f"{', '.join(lost)}; the {new_name} replacing it does not carry these over (it behaves as "
                      f"a {base_name}, synchronized). Convert such layers yourself, or leave them out",
                      UserWarning, stacklevel=user_stacklevel())


def carry_state(old: Any, new: Any, skip: Iterable[str] = (), share: Iterable[str] = ()) -> None:
    """Give ``new`` every instance attribute of ``old`` except those named in ``skip``.

    Values are taken over as they are (the same parameters, arrays and tensors, as the
    frameworks' converters share them), except plain containers (list, dict, set), which
    are copied so that the two layers do not share later additions; those named in
    ``share`` are taken over as the same object (e.g. hook dictionaries that hook handles
    refer to).
    """
    skip, share = frozenset(skip), frozenset(share)
    for key, value in vars(old).items():
        if key in skip:
            continue
        if key not in share and isinstance(value, (list, dict, set)):
            value = copy.copy(value)
        new.__dict__[key] = value


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
