"""Fixed-norm projection of scale-invariant weights after every optimizer step.

References: arXiv:1803.01814
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._common import (
    ChannelHook,
    Key,
    ParamsArg,
    channel_norms,
    check_nonzero,
    load_state_from_dict,
    required_entries,
    state_to_dict,
)
from .checks import check_norm_order, check_optimizer, check_positive_number, check_radius

__all__ = ["WeightNormProjection"]


class WeightNormProjection(ChannelHook):
    r"""Keeps each output channel of the chosen weights on a sphere of fixed radius, on any optimizer.

    For a scale-invariant weight (PAPER.md §1) only the direction :math:`\hat w = w/\lVert w\rVert` matters and
    plain SGD moves it with the effective step :math:`\eta/\lVert w\rVert^2`, so the growth of the norm during
    training silently lowers the learning rate. After every ``optimizer.step()`` this hook puts each output
    channel ``w_i`` back on its sphere:

    .. math::
        w_i \leftarrow \rho_i \, s \, \frac{w_i}{\lVert w_i \rVert_p},

    with :math:`\rho_i` the channel's radius and :math:`s` = :attr:`radius_scale`. With SGD the effective step is
    then exactly :math:`\eta/(\rho s)^2` (for the 2-norm): it follows the LR schedule and nothing else. The
    *norm schedule* of the paper replaces an LR schedule: multiplying the radius by :math:`\sqrt{10}`
    (:meth:`scale_radius`) has the effect of dividing the learning rate by 10 (exactly, for SGD without
    momentum; with momentum the buffer still holds gradients taken at the old radius for a few steps).

    It attaches through :meth:`torch.optim.Optimizer.register_step_post_hook`: the user keeps their optimizer,
    its ``state_dict()`` and LR schedulers unchanged. A step that :class:`torch.amp.GradScaler` skips (inf/NaN
    gradients) does not call ``optimizer.step()``, so nothing is projected either (a ``fused=True`` optimizer is
    stepped with ``found_inf`` instead and leaves its weights alone; projecting them again changes them only by
    rounding). Parameters without a gradient are left alone, like torch's optimizers leave them. The projection
    runs in place and without copies on any strides (channels_last included), eagerly around a model that may be
    compiled with :func:`torch.compile`. Cost: one read of the chosen weights for the norms and one in-place
    scaling (benchmarks/optim_overhead.py).

    **Which weights.** Per-output-channel weights, of at least 2 dimensions: the output channels are the slices
    along dimension 0, or along dimension 1 for a transposed convolution's weight (``ConvTranspose{1,2,3}d``, found
    from ``model``; without ``model`` every weight is sliced along dimension 0, so pass ``model=`` for transposed
    convolutions). A 1-D parameter (a bias, a batch norm's weight) is refused unless ``allow_1d=True``: each of
    its values is then a channel, projected to ``±radius``. For a transposed convolution with ``groups > 1`` a
    slice along dimension 1 holds one output channel of every group, which are scaled together.

    **Exactness.** With an absolute ``radius``, every chosen weight is put on its sphere when the hook attaches:
    training from :math:`c\,W_0` and from :math:`W_0` is then the same computation from the first step, for any
    optimizer.

    Args:
        optimizer: the optimizer that updates the weights.
        params: ``"auto"`` (the default: the weights :func:`~normdecouple.scale_invariant_parameters` finds,
            which needs ``model`` and ``example_inputs``), or an iterable of parameters or of parameter names
            (names need ``model``). Each must be in the optimizer.
        p: the norm, 1, 2 or ``math.inf``. Default: 2.
        radius: ``"init"`` (each channel's ``p``-norm when the hook attaches) or a positive number used for every
            channel, in which case the weights are projected at once. Default: ``"init"``.
        model: the model, to find weights (``params="auto"``), look up names and key the state by parameter
            name (without a model, state is keyed by the parameter's position in the optimizer).
        example_inputs: positional inputs of one call of the model, e.g. ``(batch,)``, for ``params="auto"``.
        allow_1d: accept 1-D parameters in ``params``, each value being one channel. Default: ``False``.

    Raises:
        TypeError: if ``optimizer`` is not a :class:`torch.optim.Optimizer` or ``params`` has the wrong type.
        ValueError: if a chosen parameter is not in the optimizer or is 1-D (without ``allow_1d=True``), ``p`` is
            not 1, 2 or inf, ``radius`` is not ``"init"`` nor a positive finite number, a chosen channel is zero,
            or ``params="auto"`` lacks ``model``/``example_inputs`` or finds nothing.

    Example::

        >>> import math, torch
        >>> import normdecouple as nd
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8),
        ...                             torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 10))
        >>> x = torch.randn(4, 3, 8, 8)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> proj = nd.WeightNormProjection(opt, model=model, example_inputs=(x,), radius=1.0)
        >>> proj.keys
        ['0.weight']
        >>> model(x).square().mean().backward(); opt.step()
        >>> torch.linalg.vector_norm(model[0].weight, dim=(1, 2, 3)).allclose(torch.ones(8))
        True
        >>> proj.scale_radius(math.sqrt(10))  # the norm schedule, in place of lr /= 10

    References: arXiv:1803.01814
    """

    _owner = "WeightNormProjection"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: ParamsArg = "auto",
        *,
        p: float = 2,
        radius: float | str = "init",
        model: nn.Module | None = None,
        example_inputs: Any = None,
        allow_1d: bool = False,
    ) -> None:
        check_optimizer(optimizer)
        p = check_norm_order(p)
        radius = check_radius(radius)
        super().__init__(optimizer, params, model, example_inputs, allow_1d)
        self.p = p
        self._radius_scale = 1.0
        with torch.no_grad():
            norms = channel_norms(self.params, p, self.channel_dims)
            check_nonzero(norms, self.keys, self._owner, "give those channels non-zero values, or leave the "
                          "parameter out of params")
            if radius == "init":
                self._radii = norms
            else:
                self._radii = [torch.full_like(n, radius) for n in norms]
                self._project(range(len(self.params)))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))

    @property
    def radius_scale(self) -> float:
        """The product of the factors given to :meth:`scale_radius`; each channel's radius is its base × this."""
        return self._radius_scale

    @property
    def radii(self) -> dict[Key, Tensor]:
        """The current radius of each output channel, ``{key: 1-D tensor}`` (a copy)."""
        return {k: (r * self._radius_scale).reshape(-1) for k, r in zip(self.keys, self._radii)}

    def scale_radius(self, factor: float) -> None:
        r"""Multiplies every radius by ``factor`` and moves the weights onto the new spheres now.

        The paper's norm schedule: ``factor = sqrt(10)`` in place of dividing the learning rate by 10, e.g. at the
        epochs where an LR schedule would drop it::

            for epoch in range(90):
                if epoch in (30, 60, 80):
                    proj.scale_radius(10 ** 0.5)
                train_one_epoch()

        Args:
            factor: a positive number.

        Raises:
            ValueError: if ``factor`` is not a positive finite number.
        """
        factor = check_positive_number(factor, "factor", "e.g. scale_radius(10 ** 0.5)")
        self._radius_scale *= factor
        with torch.no_grad():
            self._project(range(len(self.params)))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            self._project(self._with_grad())

    def _project(self, indices: Any) -> None:
        indices = list(indices)
        if not indices:
            return
        weights = [self.params[i] for i in indices]
        norms = channel_norms(weights, self.p, [self.channel_dims[i] for i in indices])
        # A channel that became exactly zero has no direction: it stays zero rather than turning into NaN.
        factors = [torch.where(n > 0, self._radii[i] * self._radius_scale / n, 1.0) for i, n in zip(indices, norms)]
        torch._foreach_mul_(weights, factors)

    def state_dict(self) -> dict[str, Any]:
        """The hook's state: ``p``, ``radius_scale`` and each chosen parameter's per-channel base radius.

        Radii are keyed by parameter name when the hook was given a model, else by position in the optimizer.
        """
        return {"p": self.p, "radius_scale": self._radius_scale, "radius": state_to_dict(self.keys, self._radii)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state from :meth:`state_dict` (exactly; the weights themselves come from the model's).

        Raises:
            ValueError: if an entry is missing or malformed, or the saved radii are for other parameters or other
                channel counts.
        """
        p, scale, radii = required_entries(self._owner, state_dict, ("p", "radius_scale", "radius"))
        p = check_norm_order(p, f"{self._owner}.load_state_dict")
        scale = check_positive_number(scale, "radius_scale", "the state is corrupt", f"{self._owner}.load_state_dict")
        load_state_from_dict(self._owner, "radius", self.keys, self._radii, radii)
        self.p = p
        self._radius_scale = scale

    def extra_repr(self) -> str:
        return f"p={self.p}, radius_scale={self._radius_scale}"
