r"""Per-channel learning-rate correction by the weight norm, on any optimizer, with the norm kept in a band.

The dynamics, derived (PAPER.md §1 gives the premise). For one output channel ``w`` of a scale-invariant weight
(the loss satisfies :math:`L(c\,w) = L(w)` for :math:`c > 0`), with :math:`r = \lVert w\rVert`,
:math:`\hat w = w / r` and :math:`G = r\,\nabla L(w)` the gradient at the unit sphere (the gradient at
:math:`w` is :math:`G/r`, orthogonal to :math:`w`):

1. **The correction.** :class:`NormScaledLR` multiplies the step by :math:`f = (r/\rho)^\text{power}`. With SGD
   (power 2) the step is :math:`\eta f G / r = \eta\,(r/\rho^2)\,G`, so
   :math:`w - \eta f G/r = r\,(\hat w - (\eta/\rho^2)\,G)`: the direction moves exactly as it does under
   :class:`~normdecouple.WeightNormProjection` at radius :math:`\rho`, whose step from :math:`\rho\hat w` is
   :math:`\rho\,(\hat w - (\eta/\rho^2)\,G)`. The angular step is set by :math:`\eta/\rho^2` and the schedule
   alone.

2. **Why the norm then grows geometrically.** :math:`r_{t+1}^2 = r_t^2 + \lVert s_t\rVert^2 - 2\langle w_t,
   s_t\rangle` for a step :math:`s_t`. Without momentum :math:`s_t \perp w_t` and
   :math:`r_{t+1} = r_t\sqrt{1 + \tan^2\theta_t}`, :math:`\theta_t` the angular step. Plain SGD's
   :math:`\theta_t \propto 1/r_t^2` makes that growth self-limiting (:math:`r^4` grows linearly in t); the
   correction holds :math:`\theta_t` at its scheduled size whatever :math:`r_t`, so :math:`r_t = r_0
   \exp(\tfrac12\sum\tan^2\theta)` grows geometrically. With momentum :math:`\beta` the buffer still carries
   gradients of earlier directions, which point partly against the current :math:`w` (each step moved :math:`w`
   along :math:`-G`), so :math:`\langle w_t, s_t\rangle < 0` and the growth per step reaches
   :math:`\tfrac{1+\beta}{1-\beta}\tan^2\theta` when successive gradients agree (19 times the plain rate at
   :math:`\beta = 0.9`). Measured (``benchmarks/norm_trajectory.py``, issue 21's setting: two conv-BN-ReLU
   layers, SGD lr 0.1, momentum 0.9, reference ``"init"``): without the band the mean channel norm goes
   0.58 → 2.8e3 in 100 steps and overflows to NaN before step 450; with it, it stays within 5% of the
   references (0.58 → 0.59 after 10^4 steps).

3. **The renormalisation.** Before a step, when a channel's norm has left the band
   :math:`[\rho/\kappa, \rho\kappa]` (``band`` = :math:`\kappa`), every channel of that weight is put back on its
   sphere, :math:`w \leftarrow c\,w` with :math:`c = \rho/r` per channel, and its gradient becomes
   :math:`g/c`, the gradient at :math:`c\,w`. By scale invariance the network function (in training mode) is
   unchanged. The norm before every step is therefore within :math:`[\rho/\kappa, \rho\kappa]`, for any
   optimizer and run length; one step can take it beyond by its own growth, :math:`\sqrt{1+\tan^2\theta}`-ish.

4. **The optimizer's state is left as it is, on purpose.** Its entries were taken at norms inside the band.
   Expressed at the current norm each would need the factor :math:`(r_t/r_k)^e` (:math:`e = 1` for SGD's momentum
   buffer, which holds :math:`f\,g \propto r`; :math:`e = -1, -2` for Adam's ``exp_avg``/``exp_avg_sq``, which hold
   :math:`g \propto 1/r`, and so on), and that factor is within :math:`\kappa^{\pm|e|}`: the step is within about
   a factor :math:`\kappa` of the *consistent* one, the one projection at :math:`\rho` takes (all its state is
   taken at :math:`\rho`). The other choice, rescaling the state with the weight by :math:`c^e` (so that the
   renormalisation is invisible to the next steps too), continues the run exactly as the hook without a band
   would have, whose state mixes entries that differ by the norm's growth over the optimizer's memory.
   Measured against projection's step from the same direction and gradient history (``benchmarks/
   norm_trajectory.py``, 2000 steps of a small MLP): without the band (the other choice's dynamics) 95% of the
   steps of SGD with momentum 0.9 are off by more than 1% (the largest by 6.4%) and 55% of Adam's (lr 1e-3, the
   largest by 2.0%); with ``band=1.05`` the largest deviation is 1.9% (SGD), 1.1% (Nesterov, Adam) and the run's
   mean is within 0.2%. The chosen rule is the lazy form of the exact momentum-consistent hook (rescale the
   state by :math:`(r_t/r_{t-1})^e` every step, one more pass over it): doing both at a renormalisation multiplies
   the state by :math:`(\rho/r)^e (r/\rho)^e = 1`. ``band=1`` renormalises before every step: every step then
   starts at :math:`\rho` and the directions are exactly those of :class:`~normdecouple.WeightNormProjection`.
   Since the state is never read or written, every optimizer works and none is refused: the bound on the norm
   does not depend on the optimizer, and how closely its steps follow the schedule depends on how its state
   scales, which for torch's optimizers is given above.

5. **Exactness.** For SGD without momentum the renormalisation changes no direction (there is no state): the
   directions equal projection's at :math:`\rho` for any ``band`` (the tests check 1e-10 in float64). With an
   absolute ``reference`` the weights are put on their spheres when the hook attaches, so training from
   :math:`c\,W_0` and from :math:`W_0` is the same computation, for any optimizer, up to the batch norm's and Adam's
   ``eps`` and to Adam's weight decay on these weights (decoupled or not: its decay term is not scale-invariant).

6. **What a renormalisation does not reach.** A batch norm's running statistics (eval mode) follow the scale of
   their input with their own momentum: after a renormalisation by :math:`c` they are off by up to :math:`c` in
   scale until they catch up (about 20 steps for torch's momentum 0.1 to come within 10% of the way). Without
   the band they lag behind the growing norm all the time, so the band bounds this too; evaluate after a few
   steps of training, or recompute the statistics, as for any change of weights.

References: arXiv:1803.01814
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._common import ChannelHook, Key, ParamsArg, channel_norms, check_nonzero, required_entries
from .checks import check_band, check_optimizer, check_power, check_radius

__all__ = ["DEFAULT_BAND", "NormScaledLR", "default_power"]

DEFAULT_BAND = 1.05
"""The default ``band`` of :class:`NormScaledLR`: a norm may drift 5% from its reference before it is reset,
which keeps each step within about 2% of the consistent one (module docstring, point 4)."""

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
    r"""Rescales each output channel's step by :math:`(\lVert w\rVert/\rho)^{\text{power}}`, on any optimizer,
    and keeps each norm within a band around :math:`\rho`.

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

    **The norm stays in a band.** Holding the angular step fixed makes the norm grow geometrically, much faster
    with momentum (module docstring: 0.58 → NaN within 450 steps of SGD with momentum 0.9). So, before a step, when a
    channel's norm :math:`r_i` has left :math:`[\rho_i/\text{band}, \rho_i\,\text{band}]`, every channel of that
    weight is renormalised, :math:`w_i \leftarrow (\rho_i/r_i)\,w_i`, and its gradient is divided by the same
    factor (the gradient at the renormalised weight). The model's function is unchanged (the weights are
    scale-invariant: pass only such weights, which ``params="auto"`` finds); the optimizer's state is left as it
    is, which keeps each step within about a factor ``band`` of the one
    :class:`~normdecouple.WeightNormProjection` takes at radius :math:`\rho` (the module docstring derives it;
    ``band=1`` makes the directions exactly projection's, at the cost of one more pass over the weights per step).
    The count is in :attr:`renormalizations`. Any optimizer works: the bound holds whatever its state. The band
    check reads one number back from the device per step (a host synchronisation on CUDA), for all weights together.

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

    **Exactness (absolute reference).** With an absolute ``reference`` the chosen weights are put on their spheres
    (norm :math:`\rho` per channel) when the hook attaches, so training from :math:`c\,W_0` (each chosen channel
    scaled by :math:`c > 0`) and from :math:`W_0` is the same computation for any optimizer, up to the batch
    norm's and Adam's ``eps``; it does *not* hold for Adam with weight decay on these weights (L2 or AdamW's
    decoupled decay: the decay term is scaled with the update), nor with ``reference="init"``, whose references
    scale with the weights and so preserve the plain optimizer's initial effective step instead.

    It attaches through :meth:`torch.optim.Optimizer.register_step_pre_hook` (and
    :meth:`~torch.optim.Optimizer.register_step_post_hook` for power 1): the user keeps their optimizer, its
    ``state_dict()`` and LR schedulers unchanged. A step that :class:`torch.amp.GradScaler` skips does not call
    ``optimizer.step()``, so nothing is done either (a ``fused=True`` optimizer is stepped with ``found_inf``
    instead and leaves its weights alone, and so does the rescaling). Parameters without a gradient, or whose
    gradient is the unchanged tensor of the step before (no backward since), are left alone. Param groups added
    to the optimizer later are followed (with ``params="auto"`` their scale-invariant weights are taken on, with
    their references measured or set when they join); a second ``NormScaledLR`` on a parameter is refused. Any
    strides, several param groups and compiled models work. ``optimizer.step(closure)`` cannot work through a
    pre-hook (the gradients do not exist yet when it runs) and raises a ``RuntimeError``: a training loop that
    steps with a closure (Lightning does) constructs the hook with ``attach=False`` and calls :meth:`before_step`
    once the gradients exist and :meth:`after_step` after the step.

    Args:
        optimizer: the optimizer that updates the weights.
        params: ``"auto"`` (the default: the weights :func:`~normdecouple.scale_invariant_parameters` finds,
            which needs ``model`` and ``example_inputs``), or an iterable of parameters or of parameter names
            (names need ``model``). Each must be in the optimizer; with ``"auto"``, those not in it yet are taken
            on when added (a warning says so when none is in it yet).
        reference: ``"init"`` (each channel's 2-norm when the hook attaches) or a positive number used for every
            channel. Default: ``"init"``.
        power: ``"auto"`` (2 for torch's SGD and ASGD; 1 for Adam, AdamW, Adamax, NAdam, RMSprop, Adagrad, Rprop,
            SparseAdam), 2 or 1. Other optimizers need it given. Default: ``"auto"``.
        band: a number of at least 1: a weight is renormalised before a step when one of its channels' norms
            has left ``[ρ/band, ρ·band]``. Default: :data:`DEFAULT_BAND` (1.05).
        model: the model, to find weights (``params="auto"``), look up names and key the state by parameter
            name (without a model, state is keyed by the parameter's position in the optimizer).
        example_inputs: positional inputs of one call of the model, e.g. ``(batch,)``, for ``params="auto"``.
        attach: register the step hooks on ``optimizer``. ``False`` leaves the timing to the caller
            (:meth:`before_step`, :meth:`after_step`). Default: ``True``.
        allow_1d: accept 1-D parameters in ``params``, each value being one channel. Default: ``False``.

    Attributes:
        references: each parameter's reference norm per output channel, ``{key: 1-D tensor}``.
        power: the power of the correction, 1 or 2.
        band: the band's factor.
        renormalizations: how many times a weight has been renormalised.

    Raises:
        TypeError: if ``optimizer`` is not a :class:`torch.optim.Optimizer` or ``params`` has the wrong type.
        ValueError: if a chosen parameter is not in the optimizer or is 1-D (without ``allow_1d=True``) or already
            has a ``NormScaledLR``, ``reference`` is not ``"init"`` nor a positive finite number, ``power`` is not
            1 or 2 (or ``"auto"`` with an optimizer it does not know), ``band`` is not a finite number of at least
            1, a chosen channel is zero (with ``reference="init"``), or ``params="auto"`` lacks
            ``model``/``example_inputs`` or finds nothing.

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 16, bias=False), torch.nn.BatchNorm1d(16),
        ...                             torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> x = torch.randn(8, 10)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> hook = nd.NormScaledLR(opt, model=model, example_inputs=(x,), reference=1.0)
        >>> hook.keys, hook.power, hook.band
        (['0.weight'], 2, 1.05)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 100)  # still sets the effective step
        >>> model(x).square().mean().backward(); opt.step(); sched.step()

    References: arXiv:1803.01814
    """

    _owner = "NormScaledLR"
    _what = "reference"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: ParamsArg = "auto",
        *,
        reference: float | str = "init",
        power: int | str = "auto",
        band: float = DEFAULT_BAND,
        model: nn.Module | None = None,
        example_inputs: Any = None,
        attach: bool = True,
        allow_1d: bool = False,
        _found: Sequence[str] | None = None,
    ) -> None:
        # _found: the names of the scale-invariant weights, found by the caller (the Lightning callbacks analyse
        # the training step themselves), in place of the analysis params="auto" runs.
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
        self._reference = check_radius(reference, "reference")
        self.band = check_band(band)
        super().__init__(optimizer, params, model, example_inputs, allow_1d, _found)
        self.power = int(power)
        self.renormalizations = 0
        with torch.no_grad():
            if self._reference == "init":
                check_nonzero(channel_norms(self.params, 2, self.channel_dims), self.keys, self._owner,
                              "pass an absolute reference=, or leave the parameter out of params")
            self._claim(range(len(self.params)))
            self._on_join(list(range(len(self.params))), rescale_grads=False)
        self._realign()
        # Filled by the pre-hook for the post-hook (power 1): which parameters step, their copies and factors.
        self._stepping: list[int] = []
        self._before: dict[Key, Tensor] = {}
        self._factors: list[Tensor] = []
        if attach:
            self._attach()

    def _attach(self) -> None:
        self._handles.append(self.optimizer.register_step_pre_hook(self._pre_hook))
        if self.power == 1:
            self._handles.append(self.optimizer.register_step_post_hook(self._post_hook))

    @property
    def references(self) -> dict[Key, Tensor]:
        """The reference norm :math:`\\rho` of each output channel, ``{key: 1-D tensor}`` (a copy).

        Every parameter the hook has measured, including one that left the optimizer; keyed by parameter name
        with ``model``, else by position in the optimizer. The effective step of a channel is
        ``lr / references[key]**2`` (power 2) or ``lr / references[key]`` (power 1).
        """
        return self._values_state()

    def _on_join(self, indices: list[int], rescale_grads: bool = True) -> None:
        if not indices:
            return
        params = [self.params[i] for i in indices]
        norms = channel_norms(params, 2, [self.channel_dims[i] for i in indices])
        if self._reference == "init":
            check_nonzero(norms, [self.keys[i] for i in indices], self._owner,
                          "pass an absolute reference=, or leave the parameter out of params")
            self._values.update({self.keys[i]: n for i, n in zip(indices, norms)})
            return
        # An absolute reference puts the weights on their spheres at once, so that the run does not depend on
        # their initial scale (a zero channel, with no direction, stays zero).
        for i, p, n in zip(indices, params, norms):
            rho = torch.full_like(n, self._reference)
            self._values[self.keys[i]] = rho
            c = torch.where(n > 0, rho / n, 1.0)
            p.mul_(c.to(p.dtype))
            if rescale_grads and p.grad is not None:
                p.grad.div_(c.to(p.grad.dtype))

    def before_step(self) -> None:
        """The part that runs between ``backward()`` and ``optimizer.step()``.

        Follows param groups added or removed since the last step, renormalises the weights whose norms left the
        band (their gradients with them), then ``power=2``: multiplies each chosen channel's gradient by
        ``(‖w‖/ρ)²``; ``power=1``: records the weights and factors for :meth:`after_step`. Called by the
        pre-hook; call it yourself with ``attach=False``.
        """
        with torch.no_grad():
            self._follow_param_groups()
            indices = self._fresh()
            self._stepping = indices
            if not indices:
                return
            params = [self.params[i] for i in indices]
            norms = channel_norms(params, 2, [self.channel_dims[i] for i in indices])
            ratios = list(torch._foreach_div(norms, [self._aligned[i] for i in indices]))
            renormalise = self._out_of_band(ratios)
            grad_factors: list[Tensor | None] = [None] * len(indices)
            for j in renormalise:
                # w -> c w with c = ρ/‖w‖ and g -> g/c: the gradient at the renormalised weight, whose ratio is 1.
                r = ratios[j]
                params[j].mul_(torch.where(r > 0, r.reciprocal(), 1.0).to(params[j].dtype))
                grad_factors[j] = r
                ratios[j] = torch.where(r > 0, 1.0, r)
            self.renormalizations += len(renormalise)
            if self.power == 2:
                factors = list(torch._foreach_mul(ratios, ratios))
                for j in renormalise:
                    factors[j] = grad_factors[j]  # (1)² / c
                torch._foreach_mul_([p.grad for p in params], factors)
            else:
                if renormalise:
                    torch._foreach_mul_([params[j].grad for j in renormalise], [grad_factors[j] for j in renormalise])
                self._record(indices, ratios)
            self._mark_seen(indices)

    def _out_of_band(self, ratios: list[Tensor]) -> list[int]:
        """Positions in ``ratios`` (‖w‖/ρ per channel) of the weights with a channel outside the band."""
        deviation = torch._foreach_maximum(ratios, torch._foreach_reciprocal(ratios))
        # One host synchronisation per step, for all the weights together.
        worst = torch.stack(torch._foreach_max(deviation)).tolist()
        return [j for j, d in enumerate(worst) if d > self.band]

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

    def _record(self, indices: list[int], factors: list[Tensor]) -> None:
        for i in indices:
            key = self.keys[i]
            if key not in self._before or self._before[key].shape != self.params[i].shape:
                # empty_like keeps the parameter's strides, so the copy and the lerp stay elementwise.
                self._before[key] = torch.empty_like(self.params[i])
        torch._foreach_copy_([self._before[self.keys[i]] for i in indices], [self.params[i] for i in indices])
        self._factors = factors

    def _rescale_update(self) -> None:
        if not self._stepping:
            return
        with torch.no_grad():
            # w_old + f (w_new - w_old) == lerp(w_new, w_old, 1 - f): one pass, exact when f == 1.
            weights = [(1.0 - f).to(self.params[i].dtype) for i, f in zip(self._stepping, self._factors)]
            torch._foreach_lerp_([self.params[i] for i in self._stepping],
                                 [self._before[self.keys[i]] for i in self._stepping], weights)
        self._stepping = []
        self._factors = []

    def remove(self) -> None:
        """Detaches the hook from the optimizer and frees the copies of the weights (power 1).

        Calling it twice is harmless. The parameters are free for another ``NormScaledLR`` afterwards.
        """
        super().remove()
        self._before.clear()
        self._stepping = []
        self._factors = []

    def state_dict(self) -> dict[str, Any]:
        """The hook's state: ``power``, ``band``, each parameter's per-channel reference norm, the keys of the
        parameters it waits for (``params="auto"``: not in the optimizer now) and the renormalisation count.

        References are keyed by parameter name when the hook was given a model, else by position in the
        optimizer. Nothing else decides a step: restoring the model, the optimizer and this state resumes a run
        exactly, renormalisations included.

        Returns:
            A dictionary with keys ``"power"`` (1 or 2), ``"band"`` (a float), ``"reference"`` (``{key: 1-D
            tensor}``), ``"waiting"`` (a list of keys) and ``"renormalizations"`` (a count), plain Python and
            tensors: save it next to the optimizer's ``state_dict()``.
        """
        return {"power": self.power, "band": self.band, "reference": self._values_state(),
                "waiting": self._waiting_keys(), "renormalizations": self.renormalizations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state from :meth:`state_dict` exactly.

        ``band``, ``waiting`` and ``renormalizations`` may be absent (a state saved before they existed): the
        hook's own are kept.

        Args:
            state_dict: a dictionary returned by :meth:`state_dict` (of this hook or of one built on the same
                parameters with the same ``power``).

        Raises:
            ValueError: if ``power`` or ``reference`` is missing, the saved power differs from this hook's (it
                decides how the hook is attached), the band is not a number of at least 1, or the saved
                references are for other parameters or other channel counts.
        """
        power, references = required_entries(self._owner, state_dict, ("power", "reference"))
        if power != self.power:
            raise ValueError(
                f"{self._owner}.load_state_dict: expected power={self.power} like this hook "
                f"(got {power!r}); construct the hook with power={power!r}"
            )
        band = check_band(state_dict.get("band", self.band), f"{self._owner}.load_state_dict")
        count = state_dict.get("renormalizations", self.renormalizations)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(
                f"{self._owner}.load_state_dict: expected 'renormalizations' to be a count (got {count!r}); the "
                "state is corrupt"
            )
        self._load_values(references, state_dict.get("waiting", []))
        self.band = band
        self.renormalizations = count

    def extra_repr(self) -> str:
        return f"power={self.power}, band={self.band}"
