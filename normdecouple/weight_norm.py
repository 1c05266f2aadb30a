"""Bounded weight normalization: ``w = ρ · v / ‖v‖_p`` per slice, with ρ fixed.

References: arXiv:1803.01814
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .optim.checks import check_norm_order, check_positive_number

__all__ = ["bounded_weight_norm"]


def _reduced_dims(ndim: int, dim: int | None) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if dim is None or d != dim)


class _BoundedWeightNorm(nn.Module):
    """The parametrization ``v ↦ ρ · v / ‖v‖_p``, the norm taken over every dimension but ``dim``.

    ``radius`` is a buffer of the norm's ``keepdim`` shape (like the magnitude of torch's ``weight_norm``), so
    it travels with ``state_dict()`` and ``.to()`` and receives no gradient.
    """

    def __init__(self, radius: Tensor, p: float, dim: int | None) -> None:
        super().__init__()
        self.p = p
        self.dim = dim
        self.register_buffer("radius", radius)

    def forward(self, v: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(v, ord=self.p, dim=_reduced_dims(v.dim(), self.dim), keepdim=True)
        return v * (self.radius / norm)

    def right_inverse(self, w: Tensor) -> Tensor:
        # Any v with the direction of w gives w back (when w's slices have norm ρ); w itself is the simplest.
        return w

    def extra_repr(self) -> str:
        return f"p={self.p}, dim={self.dim}"


def bounded_weight_norm(
    module: nn.Module,
    name: str = "weight",
    *,
    p: float = 2,
    dim: int | None = 0,
    radius: float | None = None,
) -> nn.Module:
    r"""Fixes the norm of each slice of a weight: ``w = ρ · v / ‖v‖_p``, with ρ a constant buffer.

    Weight normalization (Salimans & Kingma) writes ``w = g · v/‖v‖`` with a learned magnitude ``g``; on large
    tasks its learned magnitude drifts and interacts with the learning rate. Bounded weight normalization keeps
    the magnitude constant, leaving the scale to the following layer's affine parameters (PAPER.md §3). Per
    slice ``i`` of ``dim`` (each output channel for ``dim=0``):

    .. math::
        w_i = \rho_i \, \frac{v_i}{\lVert v_i \rVert_p}, \qquad p \in \{1, 2, \infty\},

    with :math:`\rho_i = \lVert w_i \rVert_p` of the weight when registered, or ``radius`` for every slice. The
    learned parameter ``v`` starts as the current weight, so with ``radius=None`` the module computes exactly
    what it computed before. It is registered with :func:`torch.nn.utils.parametrize.register_parametrization`:
    ``v`` is ``module.parametrizations[name].original``, ρ is the buffer
    ``module.parametrizations[name][0].radius`` (saved in ``state_dict()``, moved by ``.to()``, not trained),
    and :func:`torch.nn.utils.parametrize.remove_parametrizations` turns the weight back into a plain parameter
    holding ``ρ · v/‖v‖_p``. ``p=1`` and ``p=inf`` keep the weight path free of squares.

    Args:
        module: the module holding the weight.
        name: the name of the parameter to normalise. Default: ``"weight"``.
        p: the norm, 1, 2 or ``math.inf``. Default: 2.
        dim: the dimension whose slices are normalised separately (0: each output channel of a convolution or
            linear layer); ``None`` normalises the whole tensor. Default: 0.
        radius: a positive number used as ρ for every slice; ``None`` takes each slice's norm at registration.
            Default: ``None``.

    Returns:
        Module: ``module``, with the parametrization registered.

    Raises:
        TypeError: if ``module`` is not a :class:`torch.nn.Module`.
        ValueError: if ``name`` is not a parameter of ``module``, ``p`` is not 1, 2 or inf, ``dim`` is out of
            range, ``radius`` is not a positive finite number, or a slice of the weight is zero (it has no
            direction to keep).

    Example::

        >>> import torch
        >>> from torch.nn.utils import parametrize
        >>> import normdecouple as nd
        >>> conv = nd.bounded_weight_norm(torch.nn.Conv2d(3, 8, 3), radius=1.0)
        >>> torch.linalg.vector_norm(conv.weight, dim=(1, 2, 3)).allclose(torch.ones(8))
        True
        >>> parametrize.remove_parametrizations(conv, "weight")  # a plain Conv2d again
        Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))

    References: arXiv:1803.01814
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected module to be a torch.nn.Module (got {type(module).__name__})")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor) or not (
        name in module._parameters or parametrize.is_parametrized(module, name)
    ):
        params = [n for n, _ in module.named_parameters(recurse=False)]
        raise ValueError(
            f"expected name to be a parameter of {type(module).__name__} (got {name!r}; its parameters: {params})"
        )
    p = check_norm_order(p)
    if dim is not None:
        if not -weight.dim() <= dim < max(weight.dim(), 1):
            raise ValueError(
                f"expected dim in [{-weight.dim()}, {weight.dim() - 1}] for a {weight.dim()}-D weight (got {dim}); "
                "pass dim=None to normalise the whole tensor"
            )
        dim = dim % weight.dim() if weight.dim() else None
    if radius is not None:
        radius = check_positive_number(radius, "radius", "or radius=None to keep each slice's norm")

    with torch.no_grad():
        norm = torch.linalg.vector_norm(weight, ord=p, dim=_reduced_dims(weight.dim(), dim), keepdim=True)
        if not bool((norm > 0).all()):
            zero = (norm.flatten() == 0).nonzero().flatten().tolist()
            raise ValueError(
                f"expected every slice of {name!r} along dim={dim} to be non-zero (got zero slices {zero}): a zero "
                "slice has no direction to normalise; initialise it with non-zero values"
            )
        rho = norm.clone() if radius is None else torch.full_like(norm, radius)
    parametrize.register_parametrization(module, name, _BoundedWeightNorm(rho, p, dim))
    return module
