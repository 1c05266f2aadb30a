"""Fixed-norm projection of scale-invariant weights after every optimizer step.

References: arXiv:1803.01814
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._common import ChannelHook, Key, ParamsArg, channel_norms, check_nonzero, required_entries
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
    rounding). Parameters without a gradient are left alone, like torch's optimizers leave them, and so are those
    whose gradient is the unchanged tensor of the step before: a step taken without a backward since (Lightning's
    ``StochasticWeightAveraging`` ends its batch-norm epoch with one, after recomputing the running statistics of
    the averaged weights, which a projection would then no longer match). Param groups added to the optimizer
    later are followed: with ``params="auto"`` their scale-invariant weights are taken on (radius measured, or
    the weights projected, when they join, before that step); a second ``WeightNormProjection`` on a parameter
    is refused. The projection
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
            (names need ``model``). Each must be in the optimizer; with ``"auto"``, those not in it yet are taken
            on when added (a warning says so when none is in it yet).
        p: the norm, 1, 2 or ``math.inf``. Default: 2.
        radius: ``"init"`` (each channel's ``p``-norm when the hook attaches) or a positive number used for every
            channel, in which case the weights are projected at once. Default: ``"init"``.
        model: the model, to find weights (``params="auto"``), look up names and key the state by parameter
            name (without a model, state is keyed by the parameter's position in the optimizer).
        example_inputs: positional inputs of one call of the model, e.g. ``(batch,)``, for ``params="auto"``.
        allow_1d: accept 1-D parameters in ``params``, each value being one channel. Default: ``False``.

    Raises:
        TypeError: if ``optimizer`` is not a :class:`torch.optim.Optimizer` or ``params`` has the wrong type.
        ValueError: if a chosen parameter is not in the optimizer or is 1-D (without ``allow_1d=True``) or already
            has a ``WeightNormProjection``, ``p`` is not 1, 2 or inf, ``radius`` is not ``"init"`` nor a positive
            finite number, a chosen channel is zero, or ``params="auto"`` lacks ``model``/``example_inputs`` or
            finds nothing.

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
    _what = "radius"

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
        _found: Sequence[str] | None = None,
    ) -> None:
        # _found: the names of the scale-invariant weights, found by the caller (the Lightning callbacks analyse
        # the training step themselves), in place of the analysis params="auto" runs.
        check_optimizer(optimizer)
        p = check_norm_order(p)
        self._radius = check_radius(radius)
        super().__init__(optimizer, params, model, example_inputs, allow_1d, _found)
        self.p = p
        self._radius_scale = 1.0
        with torch.no_grad():
            check_nonzero(channel_norms(self.params, p, self.channel_dims), self.keys, self._owner,
                          "give those channels non-zero values, or leave the parameter out of params")
            self._claim(range(len(self.params)))
            self._on_join(list(range(len(self.params))), rescale_grads=False)
        self._realign()
        # The pre-hook follows param groups (a weight that joins is measured or projected before its first step).
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _on_join(self, indices: list[int], rescale_grads: bool = True) -> None:
        if not indices:
            return
        norms = channel_norms([self.params[i] for i in indices], self.p, [self.channel_dims[i] for i in indices])
        check_nonzero(norms, [self.keys[i] for i in indices], self._owner,
                      "give those channels non-zero values, or leave the parameter out of params")
        if self._radius == "init":
            # A weight that joins after scale_radius() keeps its norm: its base radius is that norm unscaled.
            self._values.update({self.keys[i]: n / self._radius_scale for i, n in zip(indices, norms)})
            return
        self._values.update({self.keys[i]: torch.full_like(n, self._radius) for i, n in zip(indices, norms)})
        self._realign()
        factors = self._project(indices)
        if rescale_grads:
            # A weight projected between its backward and its step: its gradient becomes the one at the
            # projected weight (g(c w) = g(w) / c for a scale-invariant weight).
            for i, c in zip(indices, factors):
                grad = self.params[i].grad
                if grad is not None:
                    grad.div_(c.to(grad.dtype))

    @property
    def radius_scale(self) -> float:
        """The product of the factors given to :meth:`scale_radius`; each channel's radius is its base × this."""
        return self._radius_scale

    @property
    def radii(self) -> dict[Key, Tensor]:
        """The current radius of each output channel, ``{key: 1-D tensor}`` (a copy).

        Every parameter the hook has measured, including one that left the optimizer.
        """
        return {k: v * self._radius_scale for k, v in self._values_state().items()}

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

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            self._follow_param_groups()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            indices = self._fresh()
            self._project(indices)
            self._mark_seen(indices)

    def _project(self, indices: Any) -> list[Tensor]:
        """Projects ``self.params[i]`` onto their spheres; returns the per-channel factors applied."""
        indices = list(indices)
        if not indices:
            return []
        weights = [self.params[i] for i in indices]
        norms = channel_norms(weights, self.p, [self.channel_dims[i] for i in indices])
        # A channel that became exactly zero has no direction: it stays zero rather than turning into NaN.
        factors = [torch.where(n > 0, self._aligned[i] * self._radius_scale / n, 1.0) for i, n in zip(indices, norms)]
        torch._foreach_mul_(weights, factors)
        return factors

    def state_dict(self) -> dict[str, Any]:
        """The hook's state: ``p``, ``radius_scale``, each parameter's per-channel base radius and the keys of the
        parameters it waits for (``params="auto"``: not in the optimizer now).

        Radii are keyed by parameter name when the hook was given a model, else by position in the optimizer.

        Returns:
            A dictionary with keys ``"p"`` (the norm), ``"radius_scale"`` (a float), ``"radius"`` (``{key: 1-D
            tensor}``, the base radii) and ``"waiting"`` (a list of keys), plain Python and tensors: save it next to
            the optimizer's ``state_dict()``.
        """
        return {"p": self.p, "radius_scale": self._radius_scale, "radius": self._values_state(),
                "waiting": self._waiting_keys()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state from :meth:`state_dict` (exactly; the weights themselves come from the model's).

        ``waiting`` may be absent (a state saved before it existed).

        Args:
            state_dict: a dictionary returned by :meth:`state_dict` (of this hook or of one built on the same
                parameters).

        Raises:
            ValueError: if an entry is missing or malformed, or the saved radii are for other parameters or other
                channel counts.
        """
        p, scale, radii = required_entries(self._owner, state_dict, ("p", "radius_scale", "radius"))
        p = check_norm_order(p, f"{self._owner}.load_state_dict")
        scale = check_positive_number(scale, "radius_scale", "the state is corrupt", f"{self._owner}.load_state_dict")
        self._load_values(radii, state_dict.get("waiting", []))
        self.p = p
        self._radius_scale = scale

    def extra_repr(self) -> str:
        return f"p={self.p}, radius_scale={self._radius_scale}"
