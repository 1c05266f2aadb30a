"""Lightning callback: fixed-norm projection of the scale-invariant weights after every optimizer step.

References: arXiv:1803.01814
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch

import normdecouple

from ._common import check_positive
from ._hook_callback import _OptimizerHookCallback

__all__ = ["WeightNormProjection"]


class WeightNormProjection(_OptimizerHookCallback):
    r"""Attaches :class:`normdecouple.WeightNormProjection` to every optimizer of the Trainer.

    After every real optimizer step each output channel :math:`w_i` of the chosen weights is put back on its
    sphere, :math:`w_i \leftarrow \rho_i\, s\, w_i / \lVert w_i\rVert_p` (see the hook's documentation). The
    hook uses the optimizer's step post-hook, so:

    - with ``accumulate_grad_batches=k`` it projects once per real step (every ``k`` batches);
    - a step that AMP's ``GradScaler`` skips ("16-mixed" with inf/NaN gradients) projects nothing;
    - the LightningModule, its ``configure_optimizers`` and LR schedulers stay unchanged.

    The hooks attach at fit start, after the optimizers are built; with ``params="auto"`` the weights are found
    by :func:`normdecouple.scale_invariant_parameters` on ``pl_module.example_input_array`` when it is set, else on
    the first training batch (then the hooks attach just before the first step). Radii and the radius scale are
    saved in Lightning checkpoints and restored on resume, so a resumed run continues like an uninterrupted one.
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
        if isinstance(p, bool) or p not in (1, 2, math.inf):
            raise ValueError(f"{self._owner}: expected p to be 1, 2 or math.inf (got {p!r})")
        if isinstance(radius, str):
            if radius != "init":
                raise ValueError(f"{self._owner}: expected radius to be 'init' or a positive number (got {radius!r})")
        else:
            radius = check_positive(radius, "radius", self._owner, "or radius='init' to keep each channel's norm")
        self.p = p
        self.radius = radius

    def _settings(self) -> dict[str, Any]:
        return {"p": self.p, "radius": self.radius}

    def _make_hook(
        self, optimizer: torch.optim.Optimizer, names: list[str], pl_module: pl.LightningModule
    ) -> normdecouple.WeightNormProjection:
        return normdecouple.WeightNormProjection(optimizer, names, p=self.p, radius=self.radius, model=pl_module)

    def scale_radius(self, factor: float) -> None:
        """Multiplies every radius by ``factor`` now (the paper's norm schedule), e.g. from ``on_train_epoch_start``.

        Raises:
            RuntimeError: if the hooks are not attached (before fit start or after teardown).
        """
        if not self.attached:
            raise RuntimeError(
                f"{self._owner}.scale_radius: the hooks are not attached; call it during fit, e.g. from a "
                "callback's or the module's on_train_epoch_start"
            )
        for hook in self._hooks:
            if hook is not None:
                hook.scale_radius(factor)
