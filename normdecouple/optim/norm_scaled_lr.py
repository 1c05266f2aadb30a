"""Per-channel learning-rate correction by the weight norm, on any optimizer.

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
from .checks import check_optimizer, check_power, check_radius

__all__ = ["NormScaledLR", "default_power"]

# torch's optimizers by how their update scales with the gradient: 2 when it is proportional to it (linear in
# the gradient stream), 1 when it does not change when the gradient is scaled. Left out, so needing power=:
# RAdam (its first steps are unadapted, proportional to the gradient), Adadelta (its numerator carries past
# updates), Adafactor (its step is relative to the weight's RMS), LBFGS (line search), Muon.
_POWER_OF_BUILTIN: dict[type, int] = {
    torch.optim.SGD: 2,
    torch.optim.ASGD: 2,
    torch.optim.Adam: 1,
    torch.optim.AdamW: 1,
    torch.optim.Adamax: 1,
    torch.optim.NAdam: 1,
    torch.optim.RMSprop: 1,
    torch.optim.Adagrad: 1,
    torch.optim.Rprop: 1,
    torch.optim.SparseAdam: 1,
}


def default_power(optimizer: torch.optim.Optimizer) -> int | None:
    """How the update of ``optimizer`` scales with the gradient: 2 (SGD-like), 1 (Adam-like), None if unknown.

    The table ``NormScaledLR(power="auto")`` uses: 2 for torch's SGD and ASGD; 1 for Adam, AdamW, Adamax,
    NAdam, RMSprop, Adagrad, Rprop and SparseAdam; ``None`` for every other optimizer (pass ``power=``).

    Example::

        >>> import torch
        >>> from normdecouple.optim import default_power
        >>> default_power(torch.optim.Adam([torch.zeros(1, requires_grad=True)]))
        1
    """
    return _POWER_OF_BUILTIN.get(type(optimizer))


class NormScaledLR(ChannelHook):
    r"""Rescales each output channel's step by :math:`(\lVert w\rVert/\rho)^{\text{power}}`, on any optimizer.

    For a scale-invariant weight (PAPER.md §1) the gradient shrinks as the norm grows,
    :math:`\nabla L(c\,w) = \nabla L(w)/c`, so SGD turns the direction with the effective step
    :math:`\eta/\lVert w\rVert^2` and Adam-like optimizers (whose update ignores the gradient's scale) with
    :math:`\eta/\lVert w\rVert`. This hook multiplies each output channel's step by

    .. math::
        f_i = \left(\frac{\lVert w_i \rVert_2}{\rho_i}\right)^{\text{power}},

    with :math:`\lVert w_i\rVert` the norm *before* the step and :math:`\rho_i` the reference, so that the
    effective step is :math:`\eta/\rho_i^2` (SGD) or :math:`\eta/\rho_i` (Adam): the LR schedule alone sets it,
    as if the norm stayed :math:`\rho_i`. Weight decay on these weights then has no role (it only raised the
    effective LR by shrinking the norm) and should be 0.

    Output channels are slices along dimension 0, or dimension 1 for a transposed convolution's weight (found
    from ``model``; pass it for ``ConvTranspose{1,2,3}d``). Only weights of at least 2 dimensions are accepted: a
    1-D parameter (a bias, initialised to zero, would get a factor of 0 and never train) is refused unless
    ``allow_1d=True``.

    How the factor is applied, by ``power``:

    - ``power=2`` (update proportional to the gradient: SGD with or without momentum, dampening, Nesterov):
      the gradient is multiplied by :math:`f_i` in a step pre-hook. Without momentum this is exactly
      :math:`f_i` times the realised update; with momentum each gradient enters the buffer with the factor of
      the step it was taken at. It needs no copy of the weights, and keeps SGD's (coupled) weight decay
      unscaled. The gradients in ``.grad`` are left multiplied after the step.
    - ``power=1`` (update independent of the gradient's scale: Adam, AdamW, RMSprop, ...): scaling the
      gradient would do nothing, so the realised update is rescaled in a post-hook,
      :math:`w \leftarrow w_\text{old} + f\,(w_\text{new} - w_\text{old})`, with a copy of the weights kept from
      the pre-hook (memory: one copy of the chosen weights).

    **Exactness (absolute reference).** Let a run start from :math:`c\,W_0` (each chosen channel scaled by
    :math:`c > 0`) and another from :math:`W_0`, with the same absolute ``reference``. Suppose that at step
    :math:`t` the scaled run's weights are :math:`c\,w_t` and its momentum buffer :math:`c\,b_t` (true at
    :math:`t = 0`: :math:`b_0 = 0`). Its gradient is :math:`g_t/c` and its factor :math:`c^2 f_t` (power 2),
    so the corrected gradient is :math:`c\,f_t g_t`; an update linear in the gradient stream (SGD with momentum,
    plus coupled weight decay, which adds :math:`\lambda\,c\,w_t`) gives the scaled buffer and update :math:`c`
    times the other run's, hence :math:`c\,w_{t+1}`. For power 1 the raw update of Adam is the same in both runs
    (its moments scale by :math:`1/c` and :math:`1/c^2`, and :math:`m/\sqrt{v}` not at all), and the factor
    :math:`c f_t` makes the realised update :math:`c` times the other run's. By induction the two runs compute
    the same network function at every step. This holds exactly up to the batch norm's ``eps`` and Adam's
    ``eps``; it does *not* hold for Adam with weight decay on these weights (L2 or AdamW's decoupled decay: the
    decay term is scaled with the update), nor with ``reference="init"``, whose references scale with the
    weights and so preserve the plain optimizer's initial effective step instead.

    It attaches through :meth:`torch.optim.Optimizer.register_step_pre_hook` (and
    :meth:`~torch.optim.Optimizer.register_step_post_hook` for power 1): the user keeps their optimizer, its
    ``state_dict()`` and LR schedulers unchanged. A step that :class:`torch.amp.GradScaler` skips does not call
    ``optimizer.step()``, so nothing is done either (a ``fused=True`` optimizer is stepped with ``found_inf``
    instead and leaves its weights alone, and so does the rescaling). Parameters without a gradient are left
    alone. Any strides, several param groups and compiled models work. ``optimizer.step(closure)`` cannot work
    through a pre-hook (the gradients do not exist yet when it runs) and raises a ``RuntimeError``: a training
    loop that steps with a closure (Lightning does) constructs the hook with ``attach=False`` and calls
    :meth:`before_step` once the gradients exist and :meth:`after_step` after the step.

    Args:
        optimizer: the optimizer that updates the weights.
        params: ``"auto"`` (the default: the weights :func:`~normdecouple.scale_invariant_parameters` finds,
            which needs ``model`` and ``example_inputs``), or an iterable of parameters or of parameter names
            (names need ``model``). Each must be in the optimizer.
        reference: ``"init"`` (each channel's 2-norm when the hook attaches) or a positive number used for every
            channel. Default: ``"init"``.
        power: ``"auto"`` (2 for torch's SGD and ASGD; 1 for Adam, AdamW, Adamax, NAdam, RMSprop, Adagrad, Rprop,
            SparseAdam), 2 or 1. Other optimizers need it given. Default: ``"auto"``.
        model: the model, to find weights (``params="auto"``), look up names and key the state by parameter
            name (without a model, state is keyed by the parameter's position in the optimizer).
        example_inputs: positional inputs of one call of the model, e.g. ``(batch,)``, for ``params="auto"``.
        attach: register the step hooks on ``optimizer``. ``False`` leaves the timing to the caller
            (:meth:`before_step`, :meth:`after_step`). Default: ``True``.
        allow_1d: accept 1-D parameters in ``params``, each value being one channel. Default: ``False``.

    Raises:
        TypeError: if ``optimizer`` is not a :class:`torch.optim.Optimizer` or ``params`` has the wrong type.
        ValueError: if a chosen parameter is not in the optimizer or is 1-D (without ``allow_1d=True``), ``reference`` is not ``"init"`` nor a positive
            finite number, ``power`` is not 1 or 2 (or ``"auto"`` with an optimizer it does not know), a chosen
            channel is zero, or ``params="auto"`` lacks ``model``/``example_inputs`` or finds nothing.

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 16, bias=False), torch.nn.BatchNorm1d(16),
        ...                             torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> x = torch.randn(8, 10)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> hook = nd.NormScaledLR(opt, model=model, example_inputs=(x,), reference=1.0)
        >>> hook.keys, hook.power
        (['0.weight'], 2)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 100)  # still sets the effective step
        >>> model(x).square().mean().backward(); opt.step(); sched.step()

    References: arXiv:1803.01814
    """

    _owner = "NormScaledLR"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: ParamsArg = "auto",
        *,
        reference: float | str = "init",
        power: int | str = "auto",
        model: nn.Module | None = None,
        example_inputs: Any = None,
        attach: bool = True,
        allow_1d: bool = False,
    ) -> None:
        check_optimizer(optimizer)
        if not isinstance(attach, bool):
            raise TypeError(f"expected attach to be a bool (got {attach!r})")
        power = check_power(power)
        if power == "auto":
            if type(optimizer) not in _POWER_OF_BUILTIN:
                raise ValueError(
                    f"power='auto' knows torch's built-in optimizers only (got {type(optimizer).__name__}): pass "
                    "power=2 if its update is proportional to the gradient (SGD-like), power=1 if it does not "
                    "change when the gradient is scaled (Adam-like)"
                )
            power = _POWER_OF_BUILTIN[type(optimizer)]
        reference = check_radius(reference, "reference")
        super().__init__(optimizer, params, model, example_inputs, allow_1d)
        self.power = int(power)
        with torch.no_grad():
            norms = channel_norms(self.params, 2, self.channel_dims)
            if reference == "init":
                check_nonzero(norms, self.keys, self._owner, "pass an absolute reference=, or leave the "
                              "parameter out of params")
                self._references = norms
            else:
                self._references = [torch.full_like(n, reference) for n in norms]
        # Filled by the pre-hook for the post-hook (power 1): which parameters step, their copies and factors.
        self._stepping: list[int] = []
        self._before: dict[int, Tensor] = {}
        self._factors: list[Tensor] = []
        if attach:
            self._attach()

    def _attach(self) -> None:
        self._handles.append(self.optimizer.register_step_pre_hook(self._pre_hook))
        if self.power == 1:
            self._handles.append(self.optimizer.register_step_post_hook(self._post_hook))

    @property
    def references(self) -> dict[Key, Tensor]:
        """The reference norm of each output channel, ``{key: 1-D tensor}`` (a copy)."""
        return state_to_dict(self.keys, self._references)

    def _factors_for(self, indices: list[int]) -> list[Tensor]:
        norms = channel_norms([self.params[i] for i in indices], 2, [self.channel_dims[i] for i in indices])
        factors = torch._foreach_div(norms, [self._references[i] for i in indices])
        if self.power == 2:
            torch._foreach_mul_(factors, factors)
        return factors

    def before_step(self) -> None:
        """The part of the rescaling that runs between ``backward()`` and ``optimizer.step()``.

        ``power=2``: multiplies each chosen channel's gradient by ``(‖w‖/ρ)²``. ``power=1``: records the
        weights and factors for :meth:`after_step`. Called by the pre-hook; call it yourself with
        ``attach=False``.
        """
        if self.power == 2:
            self._scale_gradients()
        else:
            self._record()

    def after_step(self) -> None:
        """The part that runs after ``optimizer.step()``: ``power=1`` rescales the realised update (no-op for 2)."""
        if self.power == 1:
            self._rescale_update()

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # args holds the optimizer itself first, then step's own arguments.
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
            raise RuntimeError(
                "NormScaledLR acts between backward() and step(), but a closure computes the gradients inside "
                "step(): call loss.backward() and then optimizer.step() without a closure, or construct the "
                "hook with attach=False and call hook.before_step() / hook.after_step() around the step"
            )
        self.before_step()

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.after_step()

    def _scale_gradients(self) -> None:
        with torch.no_grad():
            indices = self._with_grad()
            if indices:
                torch._foreach_mul_([self.params[i].grad for i in indices], self._factors_for(indices))

    def _record(self) -> None:
        with torch.no_grad():
            self._stepping = self._with_grad()
            for i in self._stepping:
                if i not in self._before:
                    # empty_like keeps the parameter's strides, so the copy and the lerp stay elementwise.
                    self._before[i] = torch.empty_like(self.params[i])
            if self._stepping:
                torch._foreach_copy_([self._before[i] for i in self._stepping],
                                     [self.params[i] for i in self._stepping])
                self._factors = self._factors_for(self._stepping)

    def _rescale_update(self) -> None:
        if not self._stepping:
            return
        with torch.no_grad():
            # w_old + f (w_new - w_old) == lerp(w_new, w_old, 1 - f): one pass, exact when f == 1.
            weights = [(1.0 - f).to(self.params[i].dtype) for i, f in zip(self._stepping, self._factors)]
            torch._foreach_lerp_([self.params[i] for i in self._stepping],
                                 [self._before[i] for i in self._stepping], weights)
        self._stepping = []
        self._factors = []

    def remove(self) -> None:
        """Detaches the hook from the optimizer and frees the copies of the weights (power 1).

        Calling it twice is harmless.
        """
        super().remove()
        self._before.clear()
        self._stepping = []
        self._factors = []

    def state_dict(self) -> dict[str, Any]:
        """The hook's state: ``power`` and each chosen parameter's per-channel reference norm.

        References are keyed by parameter name when the hook was given a model, else by position in the
        optimizer.
        """
        return {"power": self.power, "reference": state_to_dict(self.keys, self._references)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state from :meth:`state_dict` exactly.

        Raises:
            ValueError: if an entry is missing, the saved power differs from this hook's (it decides how the hook is attached), or
                the saved references are for other parameters or other channel counts.
        """
        power, references = required_entries(self._owner, state_dict, ("power", "reference"))
        if power != self.power:
            raise ValueError(
                f"{self._owner}.load_state_dict: expected power={self.power} like this hook "
                f"(got {power!r}); construct the hook with power={power!r}"
            )
        load_state_from_dict(self._owner, "reference", self.keys, self._references, references)

    def extra_repr(self) -> str:
        return f"power={self.power}"
