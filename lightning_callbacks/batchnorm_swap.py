"""Lightning callback: replace the LightningModule's BatchNorm layers by L1 or L∞ batch norms at setup, and those
built later (in the module's ``setup`` or ``configure_model``) once Lightning has built them.

References: arXiv:1803.01814
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

import normdecouple
from normdecouple import LpBatchNorm

from ._common import check_no_torch_layer_sync, our_layers, strategy_layer_sync
from .sync_plugin import SyncLpBatchNorm

__all__ = ["BatchNormSwap"]


class BatchNormSwap(Callback):
    r"""Converts every ``torch.nn.BatchNorm{1,2,3}d``/``SyncBatchNorm`` of the module with
    :func:`normdecouple.convert_batchnorm`, wherever the module builds them.

    Layers built in ``__init__`` are converted at setup, which runs before the strategy builds the optimizers
    (they hold the very same ``Parameter`` objects anyway). Layers built in the LightningModule's own ``setup()``
    or ``configure_model()`` (Lightning's documented places to build layers, which it calls after the callbacks'
    ``setup``) are converted as soon as Lightning has built them and set the strategy up, before anything runs
    (``on_fit_start``, or ``on_validation_start``/``on_test_start``/``on_predict_start`` for the other stages),
    as Lightning's own ``sync_batchnorm`` converts after ``configure_model``. The conversion keeps the
    ``Parameter`` objects, so the optimizers already built hold the converted layers' parameters, and the
    running statistics: a resumed run gets the checkpoint's exact values even where "16-true"/"bf16-true" built
    the layers in half precision (the statistics become float32, read from the checkpoint). Under
    ``Trainer(plugins=[SyncLpBatchNorm()])`` with DDP those layers are synchronised too. Layers built there under
    a sharded strategy (FSDP, DeepSpeed, model parallel), which has already wrapped them, are refused with a
    ``ValueError``: convert them inside ``configure_model`` (``normdecouple.convert_batchnorm(self.net, ...)``
    after building them) instead.

    Our layers have torch's parameters, buffers and state-dict keys, with a variance-equivalent ``running_var``,
    so checkpoints move both ways: a checkpoint saved before the swap resumes into the swapped module
    (``trainer.fit(model, ckpt_path=...)``), and one saved after it loads into the unmodified module
    (``Module.load_from_checkpoint``), with identical eval outputs. The swap is applied for every stage (fit,
    validate, test, predict) and layers that are already ours are left alone.
    Several processes: ``plugins=[SyncLpBatchNorm()]`` synchronises the swapped layers (timm's ``BatchNormAct2d``
    included); timm's ``timm.layers.convert_sync_batchnorm`` (its ``train.py --sync-bn``), like
    ``sync_batchnorm=True``, would turn them back into L2 batch norm (docs/distributed.md, "Several processes").

    Precision: the layers follow Lightning's precision setting; ``low_precision`` only decides the dtype of the
    statistics' arithmetic (see the table on the Lightning page, docs/lightning.md). Under "16-true"/"bf16-true"
    the running statistics stay float32.

    Args:
        norm: ``"l1"`` or ``"linf"``. Default: ``"l1"``.
        low_precision: compute the statistics in the activations' dtype (fp16/bf16) without upcasting.
            Default: ``False``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``. Default: ``"auto"``.
        **norm_kwargs: ``k`` for ``"linf"``.

    Raises:
        ValueError: at construction for an unknown ``norm`` or ``backend``, or a bad ``k``; at setup (or when the
            layers built in ``setup``/``configure_model`` are converted) if the Trainer has
            ``sync_batchnorm=True`` (use ``plugins=[SyncLpBatchNorm()]``); for layers built in
            ``setup``/``configure_model`` under a sharded strategy.
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
        # The running statistics of the checkpoint being restored, by state-dict key, for the late layers.
        self._checkpoint_stats: dict[str, Tensor] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(norm=self.norm, low_precision=self.low_precision, backend=self.backend,
                                        **self.norm_kwargs)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._checkpoint_stats = {}
        self._convert(pl_module, "")
        check_no_torch_layer_sync(trainer, pl_module, "BatchNormSwap")

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        # Lightning restores the module after configure_model and before the late conversion: a layer built
        # there in half precision ("16-true") rounds the checkpoint's float32 statistics (or overflows them to
        # inf above 65504); the conversion takes them from here instead.
        state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
        self._checkpoint_stats = {key: value for key, value in state.items()
                                  if isinstance(value, Tensor) and key.rpartition(".")[2] in _STATS}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_late(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_late(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_late(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_late(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._checkpoint_stats = {}

    def _convert(self, pl_module: pl.LightningModule, when: str) -> list[str]:
        before = set(our_layers(pl_module))
        # A LightningModule is never itself a BatchNorm, so the conversion is in place and the root stays.
        normdecouple.convert_batchnorm(pl_module, self.norm, low_precision=self.low_precision,
                                       backend=self.backend, **self.norm_kwargs)
        converted = [name for name in our_layers(pl_module) if name not in before]
        if converted:
            rank_zero_info(f"BatchNormSwap: converted {len(converted)} BatchNorm layer(s){when} to "
                           f"norm={self.norm!r}")
        return converted

    def _convert_late(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Converts the layers built after :meth:`setup`, once the strategy has set the module up."""
        saved_stats, self._checkpoint_stats = self._checkpoint_stats, {}
        late = [name for name, m in pl_module.named_modules()
                if isinstance(m, _BatchNorm) and not isinstance(m, (LpBatchNorm, torch.jit.ScriptModule))]
        if not late:
            return
        strategy = trainer.strategy
        sharded = not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(
            strategy, DeepSpeedStrategy)
        if sharded:
            raise ValueError(
                f"BatchNormSwap: the BatchNorm layers {late} were built after the callback's setup (in the "
                f"LightningModule's setup() or configure_model()), and {type(strategy).__name__} has already "
                "wrapped them, so they cannot be replaced now; expected them converted before the strategy "
                "wraps the model. Convert them where you build them, at the end of configure_model: "
                f"normdecouple.convert_batchnorm(module, {self.norm!r}, ...)"
            )
        converted = self._convert(pl_module, " built in setup()/configure_model()")
        with torch.no_grad():
            for name in converted:
                layer = pl_module.get_submodule(name)
                for stat in _STATS:
                    saved, buffer = saved_stats.get(f"{name}.{stat}"), getattr(layer, stat, None)
                    if saved is not None and isinstance(buffer, Tensor) and saved.shape == buffer.shape:
                        buffer.copy_(saved)
        check_no_torch_layer_sync(trainer, pl_module, "BatchNormSwap")
        layer_sync = strategy_layer_sync(trainer)
        if converted and trainer.state.fn == "fit" and isinstance(layer_sync, SyncLpBatchNorm):
            # The strategy synchronised the layers present when it set up (Lightning's LayerSync runs then): the
            # ones converted now join them; its teardown reverts them all.
            layer_sync.apply(pl_module)


# The buffers a conversion may widen (fp16/bf16 to float32): restored from the checkpoint being resumed.
_STATS = ("running_mean", "running_var")
