"""Small shared checks of scalar parameters."""

from __future__ import annotations

import numpy as np

from ..exceptions import InputError


def nonnegative(name, value, *, strict=False, below=None):
    """``value`` as a float, or an :class:`InputError` naming ``name``.

    Parameters
    ----------
    name : str
        Parameter name used in the message.
    strict : bool
        Require ``value > 0`` rather than ``>= 0``.
    below : float, optional
        Exclusive upper bound.
    """
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be a number, got {value!r}.")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not np.isfinite(value) or value < 0 or (strict and value == 0) or (below is not None and value >= below):
        bound = "> 0" if strict else ">= 0"
        if below is not None:
            bound += f" and < {below}"
        raise InputError(f"{name} must be finite and {bound}, got {value}.")
    return value
