"""Lightning plugin: synchronise normdecouple's batch norms across DDP processes.

References: arXiv:1803.01814
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.plugins import LayerSync
from torch.nn import Module
from typing_extensions import override

import normdecouple

__all__ = ["SyncLpBatchNorm"]


class SyncLpBatchNorm(LayerSync):
    """Synchronises the L1/L∞ batch norms under DDP: ``Trainer(plugins=[SyncLpBatchNorm()])``.

    The counterpart of ``Trainer(sync_batchnorm=True)`` for our layers, which torch's ``SyncBatchNorm`` converter
    would silently turn into L2 batch norms. Lightning calls :meth:`apply` when a DDP (or FSDP) strategy sets the
    model up for fitting and :meth:`revert` at teardown. With it, the statistics, running statistics and gradients
    equal those of one process on the global batch (gloo on CPU, NCCL on CUDA). It has no effect in one process.
    torch's own BatchNorm layers are left unsynchronised: convert them first (e.g. with :class:`BatchNormSwap`).
    Lightning itself refuses ``sync_batchnorm=True`` together with this plugin.

    Args:
        process_group: the group to synchronise over; ``None`` for the whole world. Default: ``None``.

    Example::

        >>> import pytorch_lightning as pl
        >>> from lightning_callbacks import BatchNormSwap, SyncLpBatchNorm
        >>> trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", logger=False,
        ...                      callbacks=[BatchNormSwap("l1")], plugins=[SyncLpBatchNorm()])

    References: arXiv:1803.01814
    """

    def __init__(self, process_group: Any | None = None) -> None:
        self.process_group = process_group

    @override
    def apply(self, model: Module) -> Module:
        """Replaces each normdecouple layer of ``model`` by its synchronised counterpart.

        Args:
            model: the LightningModule (Lightning calls this under DDP, before wrapping it).

        Returns:
            The model with synchronised layers (:func:`normdecouple.convert_sync_batchnorm`).

        Raises:
            ValueError: for a layer of ours that has no synchronised counterpart, as
                :func:`normdecouple.convert_sync_batchnorm` says (the model is left as it was).
        """
        return normdecouple.convert_sync_batchnorm(model, self.process_group)

    @override
    def revert(self, model: Module) -> Module:
        """Undoes :meth:`apply`: each synchronised layer becomes the class it was converted from.

        Args:
            model: a model :meth:`apply` converted.

        Returns:
            The model with unsynchronised layers (:func:`normdecouple.revert_sync_batchnorm`).

        Raises:
            ValueError: for a subclass of the synchronised layers, as :func:`normdecouple.revert_sync_batchnorm`
                says (the model is left as it was).
        """
        return normdecouple.revert_sync_batchnorm(model)
