"""The options of a Paddle-style layer (``cusyncbn.SyncBatchNorm``, ``BatchNorm1D/2D/3D``),
checked once when the layer is built.

Each check raises a built-in exception whose message starts with the layer's class name
and names what was received and what was expected; what it returns is the option as the
layer keeps it. The checks every pass makes (input, arrays, momentum and epsilon of a
functional call) are in ``_rules.py``.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from ._params import ParamAttr
from ._rules import check_bool, check_epsilon, check_momentum

#: What a layer's forward and backward return: the backend's arrays, or the input's framework.
OUTPUTS = ("backend", "input")
NONFINITE_MODES = ("warn", "raise")
#: A layer's ``act``: the activation of its fused epilogue (``functional.sync_batch_norm``'s
#: ``activation``), named as ``paddle.nn.BatchNorm``'s ``act``.
ACTS = (None, "relu")


class LayerOptions(NamedTuple):
    """A layer's options, checked (see :func:`check_layer_options`)."""

    num_features: int
    momentum: float
    epsilon: float
    data_format: str
    dtype: np.dtype
    output: str
    use_global_stats: bool | None
    unbiased_running_var: bool
    debug: bool
    nonfinite: str
    act: str | None = None


def debug_from_env() -> bool:
    """The default of a layer's ``debug``: whether ``CUSYNCBN_DEBUG`` is set to something
    other than empty, ``0``, ``false`` or ``no``."""
    return os.environ.get("CUSYNCBN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def check_output(output: Any, where: str) -> str:
    """``output`` when it is one of :data:`OUTPUTS`.

    Raises:
        ValueError: anything else.
    """
    if output not in OUTPUTS:
        raise ValueError(f"{where}: output must be one of {OUTPUTS}, got {output!r}")
    return output


def check_act(act: Any, where: str) -> str | None:
    """``act`` when it is one of :data:`ACTS`: None, or ``"relu"`` (``y = relu(BN(x) + residual)``
    in the layer's own passes).

    Raises:
        ValueError: anything else (another activation's name, another spelling, a non-string);
            the message says to apply other activations as layers of their own.

    Example:
        >>> check_act("relu", "SyncBatchNorm")
        'relu'
        >>> check_act("gelu", "SyncBatchNorm")                             # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: SyncBatchNorm: act must be None or 'relu' (the fused epilogue's activations), got 'gelu'; ...
    """
    if act is None or (isinstance(act, str) and act == "relu"):
        return act
    raise ValueError(f"{where}: act must be None or 'relu' (the fused epilogue's activations), got {act!r}; "
                     "apply other activations as layers of their own")


def check_layer_options(where: str, formats: tuple, *, num_features: Any, momentum: Any, epsilon: Any,
                        data_format: Any, dtype: Any, output: Any, use_global_stats: Any,
                        unbiased_running_var: Any, debug: Any, nonfinite: Any, act: Any = None) -> LayerOptions:
    """The options of a layer of class ``where`` that takes the data formats ``formats``.

    Args:
        where: the layer's class name (messages start with it).
        formats: the data formats this class of layer takes.
        num_features, momentum, epsilon, data_format, dtype, output, use_global_stats,
            unbiased_running_var, debug, nonfinite, act: as :class:`cusyncbn.SyncBatchNorm` takes
            them; ``debug=None`` reads ``CUSYNCBN_DEBUG`` (:func:`debug_from_env`).

    Returns:
        The options as a layer keeps them (``dtype`` a NumPy dtype, numbers as ``int`` /
        ``float``, flags as ``bool``).

    Raises:
        ValueError: ``num_features`` not a positive int; ``data_format`` not in
            ``formats``; ``output``, ``nonfinite`` or ``act`` not one of theirs; ``momentum``
            outside [0, 1]; a negative or non-finite ``epsilon``.
        TypeError: ``momentum=None`` (Paddle's layers have no cumulative average); a
            non-numeric momentum or epsilon; ``dtype`` not float32 / float64; a flag
            (``use_global_stats``, ``unbiased_running_var``, ``debug``) not a bool.

    Example:
        >>> options = check_layer_options("SyncBatchNorm", ("NC", "NCHW"), num_features=8, momentum=0.9,
        ...                               epsilon=1e-5, data_format="NCHW", dtype="float32", output="backend",
        ...                               use_global_stats=None, unbiased_running_var=False, debug=False,
        ...                               nonfinite="warn")
        >>> options.num_features, options.dtype
        (8, dtype('float32'))
    """
    if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) or num_features <= 0:
        raise ValueError(f"{where}: num_features must be a positive int, got {num_features!r}")
    if data_format not in formats:
        raise ValueError(f"{where}: data_format must be one of {list(formats)}, got {data_format!r}")
    if momentum is None:
        raise TypeError(f"{where}: momentum must be a float in [0, 1], got None (Paddle's layers have no "
                        "cumulative-average mode; cusyncbn.torch.SyncBatchNorm has momentum=None)")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"{where}: dtype (of parameters and running statistics) must be float32 or float64, "
                        f"got {dtype!r}")
    check_output(output, where)
    if use_global_stats is not None:
        check_bool(use_global_stats, "use_global_stats", where)
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"{where}: nonfinite must be 'warn' or 'raise', got {nonfinite!r}")
    act = check_act(act, where)
    return LayerOptions(
        num_features=int(num_features), momentum=check_momentum(momentum, where),
        epsilon=check_epsilon(epsilon, where), data_format=data_format, dtype=np.dtype(dtype), output=output,
        use_global_stats=use_global_stats, unbiased_running_var=check_bool(unbiased_running_var,
                                                                           "unbiased_running_var", where),
        debug=debug_from_env() if debug is None else check_bool(debug, "debug", where), nonfinite=nonfinite,
        act=act)


def check_comm_taken(where: str, sync: bool, comm: Any) -> None:
    """Nothing when a layer of class ``where`` takes ``comm`` (synchronized layers take any;
    a communicator's own checks come when it is resolved).

    Raises:
        TypeError: a ``comm`` given to a layer that is not synchronized.
    """
    if not sync and comm is not None:
        raise TypeError(f"{where} is not synchronized and takes no comm; "
                        "use SyncBatchNorm or convert_sync_batchnorm")


def check_param_attr(attr: Any, role: str, where: str) -> ParamAttr | None:
    """A layer's ``weight_attr`` / ``bias_attr`` (``role``: ``"weight"`` / ``"bias"``) as the
    layer builds its parameter from it: None for no parameter (``False``), the default
    :class:`~cusyncbn.ParamAttr` for ``None`` / ``True``, else the attribute itself.

    Raises:
        TypeError: anything but None, True, False or a ``cusyncbn.ParamAttr``.

    Example:
        >>> check_param_attr(False, "weight", "SyncBatchNorm") is None
        True
        >>> check_param_attr("ones", "weight", "SyncBatchNorm")              # doctest: +ELLIPSIS
        Traceback (most recent call last):
        TypeError: SyncBatchNorm: weight_attr must be None, False or a cusyncbn.ParamAttr, got str
    """
    if attr is False:
        return None
    if attr is None or attr is True:
        return ParamAttr()
    if not isinstance(attr, ParamAttr):
        raise TypeError(f"{where}: {role}_attr must be None, False or a cusyncbn.ParamAttr, "
                        f"got {type(attr).__name__}")
    return attr


def check_initializer_shape(got: tuple, expected: tuple, role: str, where: str) -> None:
    """Nothing when a parameter initializer's result has the parameter's shape.

    Raises:
        ValueError: another shape.
    """
    if tuple(got) != expected:
        raise ValueError(f"{where}: {role} initializer returned shape {tuple(got)}, expected {expected}")
