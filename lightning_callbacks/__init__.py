"""Lightning callbacks and the Trainer plugin of normdecouple.

The one package of this distribution that imports ``pytorch_lightning``: ``import normdecouple`` works without
it. Each callback or plugin lives in its own file:

- :class:`BatchNormSwap` (``batchnorm_swap.py``): BatchNorm layers to L1/L∞ at setup;
- :class:`WeightNormProjection` (``weight_norm_projection.py``) and :class:`NormScaledLR`
  (``norm_scaled_lr.py``): normdecouple's optimizer hooks on every optimizer of the Trainer, saved in checkpoints;
- :class:`WeightNormMonitor` (``weight_norm_monitor.py``): weight norms, effective LRs and angular updates;
- :class:`SyncLpBatchNorm` (``sync_plugin.py``): a ``LayerSync`` plugin synchronising our layers under DDP.

References: arXiv:1803.01814
"""

from .batchnorm_swap import BatchNormSwap
from .norm_scaled_lr import NormScaledLR
from .sync_plugin import SyncLpBatchNorm
from .weight_norm_monitor import WeightNormMonitor
from .weight_norm_projection import WeightNormProjection

__all__ = ["BatchNormSwap", "WeightNormProjection", "NormScaledLR", "WeightNormMonitor", "SyncLpBatchNorm"]
