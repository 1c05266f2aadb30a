"""Lightning callback: fixed-norm projection of the scale-invariant weights after every optimizer step.

References: arXiv:1803.01814
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch

import normdecouple
from normdecouple.optim.checks import check_norm_order, check_positive_number, check_radius

from ._hook_callback import OptimizerHookCallback

__all__ = ["WeightNormProjection"]


class WeightNormProjection(OptimizerHookCallback):
    r"""Attaches :class:`normdecouple.WeightNormProjection` to every optimizer of the Trainer.

    After every real optimizer step each output channel :math:`w_i` of the chosen weights is put back on its
    sphere, :math:`w_i \leftarrow \rho_i\, s\, w_i / \lVert w_i\rVert_p` (see the hook's documentation). The
    hook uses the optimizer's step post-hook, so:

    - with ``accumulate_grad_batches=k`` it projects once per real step (every ``k`` batches);
    - a step that AMP's ``GradScaler`` skips ("16-mixed" with inf/NaN gradients) projects nothing;
    - a step without a backward since the last one projects nothing: ``StochasticWeightAveraging`` ends its
      batch-norm epoch with one, after recomputing the statistics of the averaged weights (shorter than the
      radius, since they average directions), which a projection would no longer match;
    - param groups added later are followed: the backbone that ``BackboneFinetuning`` adds at its unfreeze epoch
      is projected from its first step (with ``params="auto"``; ``"init"`` radii measured when it joins);
    - the LightningModule, its ``configure_optimizers`` and LR schedulers stay unchanged.

    The hooks attach at fit start, after the optimizers are built; with ``params="auto"`` the weights are found
    at the start of the first training batch, in the modes its step runs in (Lightning does not call
    ``train()``), by :func:`normdecouple.scale_invariance.scale_invariant_parameters_as_set` on
    ``pl_module.example_input_array`` when it is set (and the module has a ``forward``), else on that batch,
    before its forward. A module without
    ``forward`` (its ``training_step`` calls ``self.net(x)``), or a batch whose inputs cannot be told, is followed
    through its real first training step instead, as it runs (:class:`normdecouple.scale_invariance.ScaleInvarianceTrace`
    from ``on_train_batch_start`` to the loss in ``on_before_backward``: no extra forward). The hooks then attach
    after that step's backward, before its optimizer step; with an absolute ``radius`` (or a :meth:`scale_radius`
    factor given before) the weights are put on their spheres then and that step's gradients rescaled to match,
    so the step equals one taken with the weights projected before the forward (the batch norms' running
    statistics of that one batch alone still saw the unprojected weights). Radii and the radius scale are saved
    in Lightning checkpoints and restored on resume, and a resumed run attaches at fit start to the weights its
    checkpoint names, so it continues like an uninterrupted one.
    The hooks are removed at teardown. Every ``fit`` starts the hooks afresh (``"init"`` measured again) unless it
    resumes from a checkpoint (``ckpt_path=``).

    Args:
        params: ``"auto"`` or an iterable of parameter names of the LightningModule. Default: ``"auto"``.
        p: the norm, 1, 2 or ``math.inf``. Default: 2.
        radius: ``"init"`` (each channel's norm when the hooks attach) or a positive number for every channel.
            Default: ``"init"``.
        batch_to_inputs: for ``params="auto"`` without ``example_input_array``: a function from a training batch
            to the tuple of ``forward``'s positional arguments. Default: ``None`` (the batch itself if a tensor,
            else its first item).

    Raises:
        ValueError: at construction for a bad ``params``, ``p`` or ``radius``; at setup if the Trainer has
            ``sync_batchnorm=True`` and the module has normdecouple layers.

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_callbacks import BatchNormSwap, WeightNormProjection
        >>> trainer = pl.Trainer(callbacks=[BatchNormSwap("l1"), WeightNormProjection(radius=1.0)],
        ...                      accelerator="cpu", logger=False)

    References: arXiv:1803.01814
    """

    _owner = "WeightNormProjection"

    def __init__(
        self,
        params: str | Iterable[str] = "auto",
        *,
        p: float = 2,
        radius: float | str = "init",
        batch_to_inputs: Callable[[Any], tuple] | None = None,
    ) -> None:
        super().__init__(params, batch_to_inputs)
        self.p = check_norm_order(p, self._owner)
        self.radius = check_radius(radius, "radius", self._owner)
        # The product of the scale_radius factors given while the hooks were not attached.
        self._kept_factor = 1.0

    def _settings(self) -> dict[str, Any]:
        return {"p": self.p, "radius": self.radius}

    def _saved_names(self, hook_state: dict[str, Any]) -> list[str]:
        radius = hook_state.get("radius") if isinstance(hook_state, dict) else None
        if not isinstance(radius, dict):
            raise ValueError(
                f"{self._owner}: expected each saved hook state to hold 'radius', a dict keyed by parameter name "
                "(got none); resume from a checkpoint saved with this callback"
            )
        return [*radius, *hook_state.get("waiting", [])]

    def _make_hook(
        self, optimizer: torch.optim.Optimizer, names: list[str], pl_module: pl.LightningModule, auto: bool
    ) -> normdecouple.WeightNormProjection:
        return normdecouple.WeightNormProjection(
            optimizer, "auto" if auto else names, p=self.p, radius=self.radius, model=pl_module,
            _found=names if auto else None,
        )

    def _after_attach(self) -> None:
        # Also moves the weights onto the restored spheres: an absolute radius projected them onto the unscaled
        # ones when the hook was built, before its saved radius scale was loaded.
        factor, self._kept_factor = self._kept_factor, 1.0
        for hook in self._hooks:
            if hook is not None:
                hook.scale_radius(factor)

    def scale_radius(self, factor: float) -> None:
        """Multiplies every radius by ``factor`` (the paper's norm schedule), from any hook, at any time.

        With the hooks attached the weights move onto the new spheres now. Before they attach (before fit, or
        before the first training step when the weights are found from it) the factor is kept and applied when
        they attach, after the radii are measured or restored from a checkpoint; factors given twice multiply.
        E.g. from a callback's ``on_train_epoch_start``::

            if trainer.current_epoch in (30, 60, 80):
                projection.scale_radius(10 ** 0.5)

        Args:
            factor: a positive finite number (``10 ** 0.5`` has the effect of dividing the learning rate by 10).

        Raises:
            ValueError: if ``factor`` is not a positive finite number.
        """
        factor = check_positive_number(factor, "factor", "e.g. scale_radius(10 ** 0.5)", self._owner)
        if not self.attached:
            self._kept_factor *= factor
            return
        for hook in self._hooks:
            if hook is not None:
                hook.scale_radius(factor)
