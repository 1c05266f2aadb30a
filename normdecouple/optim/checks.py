"""The argument checks of the optimizer hooks, public so that every front end (the Lightning callbacks included)
validates with the same code and the same messages.

Each returns the checked value (normalised: a float, an int) or raises a ``ValueError``/``TypeError`` saying what
was expected, what was given and how to fix it. ``owner`` prefixes the message with the caller's name.

References: arXiv:1803.01814
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "NORM_ORDERS",
    "check_band",
    "check_norm_order",
    "check_optimizer",
    "check_positive_number",
    "check_power",
    "check_radius",
]

NORM_ORDERS = (1, 2, math.inf)
"""The norms the hooks and :func:`~normdecouple.bounded_weight_norm` accept: 1, 2 and infinity."""


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def check_positive_number(value: Any, what: str, remedy: str, owner: str | None = None) -> float:
    """``value`` as a float if it is a positive finite real number (not a bool), else a ``ValueError``.

    Example::

        >>> from normdecouple.optim.checks import check_positive_number
        >>> check_positive_number(2, "radius", "e.g. radius=1.0")
        2.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{_prefix(owner)}expected {what} to be a positive finite number (got {value!r}); {remedy}")
    return float(value)


def check_norm_order(p: Any, owner: str | None = None) -> float:
    """``p`` if it is 1, 2 or ``math.inf``, else a ``ValueError``."""
    if isinstance(p, bool) or p not in NORM_ORDERS:
        raise ValueError(f"{_prefix(owner)}expected p to be 1, 2 or math.inf (got {p!r})")
    return p


def check_radius(value: Any, what: str = "radius", owner: str | None = None) -> float | str:
    """``"init"`` or a positive finite number (returned as a float), else a ``ValueError`` naming ``what``."""
    if isinstance(value, str):
        if value != "init":
            raise ValueError(f"{_prefix(owner)}expected {what} to be 'init' or a positive number (got {value!r})")
        return value
    return check_positive_number(
        value, what, f"or {what}='init' to use each channel's norm when the hook attaches", owner
    )


def check_band(band: Any, owner: str | None = None) -> float:
    """``band`` as a float if it is a finite real number of at least 1 (not a bool), else a ``ValueError``.

    The band of :class:`~normdecouple.NormScaledLR`: a channel is renormalised when its norm leaves
    ``[ρ / band, ρ · band]``; 1 renormalises before every step.

    Example::

        >>> from normdecouple.optim.checks import check_band
        >>> check_band(1.05)
        1.05
    """
    if isinstance(band, bool) or not isinstance(band, (int, float)) or not 1 <= band < math.inf:
        raise ValueError(
            f"{_prefix(owner)}expected band to be a finite number of at least 1 (got {band!r}): the factor by which "
            "a channel's norm may drift from its reference before the weight is renormalised, e.g. band=1.05"
        )
    return float(band)


def check_power(power: Any, owner: str | None = None) -> int | str:
    """``"auto"``, 1 or 2, else a ``ValueError``: 2 for SGD-like optimizers, 1 for Adam-like ones."""
    if isinstance(power, str) and power == "auto":
        return power
    if isinstance(power, bool) or isinstance(power, str) or power not in (1, 2):
        raise ValueError(
            f"{_prefix(owner)}expected power to be 'auto', 1 or 2 (got {power!r}): 2 for an update proportional "
            "to the gradient (SGD-like), 1 for one independent of the gradient's scale (Adam-like)"
        )
    return int(power)


def check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """``optimizer`` if it is a :class:`torch.optim.Optimizer`, else a ``TypeError``."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"expected optimizer to be a torch.optim.Optimizer (got {type(optimizer).__name__}); pass the "
            "optimizer object, not its parameters"
        )
    return optimizer
