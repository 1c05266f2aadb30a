"""Lightning callback: replace the LightningModule's BatchNorm layers by L1 or L∞ batch norms at setup.

References: arXiv:1803.01814
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

import normdecouple

from ._common import check_no_torch_layer_sync, our_layers

__all__ = ["BatchNormSwap"]


class BatchNormSwap(Callback):
    r"""Converts every ``torch.nn.BatchNorm{1,2,3}d``/``SyncBatchNorm`` of the module with
    :func:`normdecouple.convert_batchnorm` at setup.

    ``setup`` runs before the strategy builds the optimizers, so they hold the converted layers' parameters
    (which are the very same ``Parameter`` objects anyway). Our layers have torch's parameters, buffers and
    state-dict keys, with a variance-equivalent ``running_var``, so checkpoints move both ways: a checkpoint saved
    before the swap resumes into the swapped module (``trainer.fit(model, ckpt_path=...)``), and one saved after
    it loads into the unmodified module (``Module.load_from_checkpoint``), with identical eval outputs. The swap is
    applied for every stage (fit, validate, test, predict) and layers that are already ours are left alone.
    Several processes: ``plugins=[SyncLpBatchNorm()]`` synchronises the swapped layers (timm's ``BatchNormAct2d``
    included); timm's ``timm.layers.convert_sync_batchnorm`` (its ``train.py --sync-bn``), like
    ``sync_batchnorm=True``, would turn them back into L2 batch norm (README, "Several processes").

    Precision: the layers follow Lightning's precision setting; ``low_precision`` only decides the dtype of the
    statistics' arithmetic (see the README's table). Under "16-true"/"bf16-true" the running statistics stay
    float32.

    Args:
        norm: ``"l1"`` or ``"linf"``. Default: ``"l1"``.
        low_precision: compute the statistics in the activations' dtype (fp16/bf16) without upcasting.
            Default: ``False``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``. Default: ``"auto"``.
        **norm_kwargs: ``k`` for ``"linf"``.

    Raises:
        ValueError: at construction for an unknown ``norm`` or ``backend``, or a bad ``k``; at setup if the Trainer
            has ``sync_batchnorm=True`` (use ``plugins=[SyncLpBatchNorm()]``).
        TypeError: at construction for keyword arguments the norm does not take.

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_callbacks import BatchNormSwap
        >>> trainer = pl.Trainer(callbacks=[BatchNormSwap("linf", k=4, low_precision=True)],
        ...                      precision="bf16-mixed", accelerator="cpu", logger=False)

    References: arXiv:1803.01814
    """

    def __init__(self, norm: str = "l1", *, low_precision: bool = False, backend: str = "auto",
                 **norm_kwargs: Any) -> None:
        if not isinstance(low_precision, bool):
            raise TypeError(f"BatchNormSwap: expected low_precision to be a bool (got {type(low_precision).__name__})")
        # Converting an empty module runs convert_batchnorm's own checks of norm, backend and k now rather than
        # at setup, without repeating them here.
        normdecouple.convert_batchnorm(nn.Identity(), norm, low_precision=low_precision, backend=backend,
                                       **norm_kwargs)
        self.norm = norm
        self.low_precision = low_precision
        self.backend = backend
        self.norm_kwargs = dict(norm_kwargs)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(norm=self.norm, low_precision=self.low_precision, backend=self.backend,
                                        **self.norm_kwargs)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        before = len(our_layers(pl_module))
        # A LightningModule is never itself a BatchNorm, so the conversion is in place and the root stays.
        normdecouple.convert_batchnorm(pl_module, self.norm, low_precision=self.low_precision,
                                       backend=self.backend, **self.norm_kwargs)
        converted = len(our_layers(pl_module)) - before
        if converted:
            rank_zero_info(f"BatchNormSwap: converted {converted} BatchNorm layer(s) to norm={self.norm!r}")
        check_no_torch_layer_sync(trainer, pl_module, "BatchNormSwap")
