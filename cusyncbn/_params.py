"""Parameters and their attributes, after ``paddle.ParamAttr`` / ``paddle.Parameter``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

Initializer = Union[float, int, Callable[[tuple, Any], Any], None]


@dataclass
class ParamAttr:
    """How a layer creates one of its parameters.

    Args:
        name: the parameter's name (default: ``"<layer name>.weight"`` / ``".bias"``).
        initializer: a constant, or a callable ``(shape, dtype) -> array`` (any array
            the layer's device accepts). Default: ones for the weight, zeros for the bias.
        learning_rate: a per-parameter learning-rate multiplier, kept on the
            parameter for the user's optimizer (cusyncbn has no optimizer).
        trainable: False keeps the parameter but computes no gradient for it.

    Example:
        >>> import cusyncbn
        >>> bn = cusyncbn.SyncBatchNorm(4, weight_attr=cusyncbn.ParamAttr(initializer=0.5))
        >>> float(bn.weight.data[0])
        0.5
    """

    name: str | None = None
    initializer: Initializer = None
    learning_rate: float = 1.0
    trainable: bool = True


class Parameter:
    """An array with a gradient slot.

    Attributes:
        data: the array (NumPy or CuPy, on the layer's device).
        grad: the accumulated gradient, same shape and dtype, or None before the
            first backward / after ``clear_gradient()``.
        trainable: whether backward computes a gradient for it.
        name: its name (default ``"<layer name>.weight"`` / ``".bias"``); the layer's
            ``state_dict()`` keys are ``weight`` / ``bias``.
        learning_rate: multiplier from :class:`ParamAttr`.
    """

    __slots__ = ("data", "grad", "trainable", "name", "learning_rate")

    def __init__(self, data: Any, name: str, trainable: bool = True, learning_rate: float = 1.0) -> None:
        self.data = data
        self.grad = None
        self.trainable = bool(trainable)
        self.name = name
        self.learning_rate = float(learning_rate)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    def clear_gradient(self) -> None:
        """Forget the accumulated gradient."""
        self.grad = None

    def __repr__(self) -> str:
        return (f"Parameter(name={self.name!r}, shape={self.shape}, dtype={self.dtype}, "
                f"trainable={self.trainable})")
