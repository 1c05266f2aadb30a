"""Lightning callback: per-channel learning-rate correction by the weight norm.

References: arXiv:1803.01814
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

import normdecouple
from normdecouple.optim.checks import check_band, check_power, check_radius
from normdecouple.optim.norm_scaled_lr import DEFAULT_BAND

from ._hook_callback import OptimizerHookCallback

__all__ = ["NormScaledLR"]


class NormScaledLR(OptimizerHookCallback):
    r"""Attaches :class:`normdecouple.NormScaledLR` to every optimizer of the Trainer.

    Each output channel's step is multiplied by :math:`(\lVert w_i\rVert/\rho_i)^{\text{power}}`, so the effective
    step of a scale-invariant weight (:math:`\eta/\lVert w\rVert^2` for SGD, :math:`\eta/\lVert w\rVert` for Adam)
    follows the LR schedule as if the norm stayed :math:`\rho_i`, and a weight whose norm leaves
    ``[ρ/band, ρ·band]`` is renormalised before the step, which keeps the norms bounded on any run length (see the
    hook's documentation).

    Lightning steps its optimizers with a closure (``optimizer.step(closure)``, the closure running the
    backward), so the gradients do not exist yet when the optimizer's step pre-hook runs. This callback therefore
    runs the hook's before-step part from ``on_before_optimizer_step`` (after the backward and AMP's unscaling,
    before gradient clipping, which then clips the rescaled gradient) and its after-step part (``power=1``) from
    the optimizer's step post-hook. Hence: once per real step under ``accumulate_grad_batches``; on a step that
    AMP's ``GradScaler`` skips, the gradients (inf/NaN anyway) are scaled but the weights are not stepped (a
    renormalisation may still move them, which does not change the function).

    Lightning's own callbacks: the hooks follow param groups added later, so the backbone that
    ``BackboneFinetuning`` adds at its unfreeze epoch is taken on then (with ``params="auto"``; its references
    measured when it joins, and saved in checkpoints, also while it is still waited for); and the step that
    ``StochasticWeightAveraging`` takes without a backward at the end of its batch-norm epoch, after recomputing
    the statistics of the averaged weights, is left to the optimizer alone.

    The hooks attach at fit start (with ``params="auto"``: at the start of the first training batch, in the
    modes its step runs in, ``example_input_array`` included; for a module without ``forward``, after the first training step's backward, the weights found by
    following that step as it runs, as :class:`WeightNormProjection` describes), their reference norms are saved in Lightning checkpoints and restored on resume, and they are
    removed at teardown. Every ``fit`` starts the hooks afresh (``"init"`` measured again) unless it
    resumes from a checkpoint (``ckpt_path=``).

    Args:
        params: ``"auto"`` or an iterable of parameter names of the LightningModule. Default: ``"auto"``.
        reference: ``"init"`` (each channel's 2-norm when the hooks attach) or a positive number. Default:
            ``"init"``.
        power: ``"auto"`` (from the optimizer's type: 2 for SGD-like, 1 for Adam-like), 1 or 2. Default:
            ``"auto"``.
        band: a weight is renormalised before a step when one of its channels' norms has left
            ``[ρ/band, ρ·band]`` (see :class:`normdecouple.NormScaledLR`). Default: 1.05.
        batch_to_inputs: for ``params="auto"`` without ``example_input_array``: a function from a training batch
            to the tuple of ``forward``'s positional arguments. Default: ``None`` (the batch itself if a tensor,
            else its first item).

    Raises:
        ValueError: at construction for a bad ``params``, ``reference``, ``power`` or ``band``; at setup if the Trainer has
            ``sync_batchnorm=True`` and the module has normdecouple layers.

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_callbacks import NormScaledLR
        >>> trainer = pl.Trainer(callbacks=[NormScaledLR(reference=1.0)], accelerator="cpu", logger=False)

    References: arXiv:1803.01814
    """

    _owner = "NormScaledLR"

    def __init__(
        self,
        params: str | Iterable[str] = "auto",
        *,
        reference: float | str = "init",
        power: int | str = "auto",
        band: float = DEFAULT_BAND,
        batch_to_inputs: Callable[[Any], tuple] | None = None,
    ) -> None:
        super().__init__(params, batch_to_inputs)
        reference = check_radius(reference, "reference", self._owner)
        power = check_power(power, self._owner)
        self.reference = reference
        self.power = power
        self.band = check_band(band, self._owner)
        self._post_handles: list[RemovableHandle] = []

    def _settings(self) -> dict[str, Any]:
        # The default band is left out of the state key, which then stays that of callbacks saved before it existed.
        band = {} if self.band == DEFAULT_BAND else {"band": self.band}
        return {"reference": self.reference, "power": self.power, **band}

    def _saved_names(self, hook_state: dict[str, Any]) -> list[str]:
        reference = hook_state.get("reference") if isinstance(hook_state, dict) else None
        if not isinstance(reference, dict):
            raise ValueError(
                f"{self._owner}: expected each saved hook state to hold 'reference', a dict keyed by parameter "
                "name (got none); resume from a checkpoint saved with this callback"
            )
        return [*reference, *hook_state.get("waiting", [])]

    def _make_hook(
        self, optimizer: torch.optim.Optimizer, names: list[str], pl_module: pl.LightningModule, auto: bool
    ) -> normdecouple.NormScaledLR:
        # Lightning steps with a closure, which computes the gradients inside step(): a pre-hook would run too
        # early, so the before-step part is driven from on_before_optimizer_step instead.
        hook = normdecouple.NormScaledLR(
            optimizer, "auto" if auto else names, reference=self.reference, power=self.power, band=self.band,
            model=pl_module, attach=False, _found=names if auto else None,
        )
        self._post_handles.append(optimizer.register_step_post_hook(lambda *_: hook.after_step()))
        return hook

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        hook = self._hook_of(trainer, optimizer)
        if hook is None:
            return
        hook.before_step()

    def _hook_of(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> normdecouple.NormScaledLR | None:
        for i, opt in enumerate(trainer.optimizers):
            if opt is optimizer and i < len(self._hooks):
                return self._hooks[i]
        return None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for handle in self._post_handles:
                handle.remove()
            self._post_handles = []
        super().teardown(trainer, pl_module, stage)
