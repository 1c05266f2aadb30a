"""normdecouple: the normalization schemes of *Norm matters* (Hoffer, Banner, Golan, Soudry, NeurIPS 2018).

L1 and L-infinity batch normalization as drop-in replacements for torch's BatchNorm, converters between them,
their synchronised (multi-process) counterparts, and optimizer hooks that decouple the weight norm from the
objective.

References: arXiv:1803.01814
"""

from .batchnorm import (
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    L1BatchNormNd,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
    LinfBatchNormNd,
    LpBatchNorm,
)
from .batchnorm_act import (
    L1BatchNormAct1d,
    L1BatchNormAct2d,
    L1BatchNormAct3d,
    LinfBatchNormAct1d,
    LinfBatchNormAct2d,
    LinfBatchNormAct3d,
)
from .convert import convert_batchnorm, convert_sync_batchnorm, revert_batchnorm, revert_sync_batchnorm
from .distributed import SyncL1BatchNorm, SyncLinfBatchNorm
from .optim import NormScaledLR, WeightNormProjection
from .scale_invariance import scale_invariant_parameters
from .weight_norm import bounded_weight_norm

__version__ = "0.1.0"

__all__ = [
    "LpBatchNorm",
    "L1BatchNorm1d",
    "L1BatchNorm2d",
    "L1BatchNorm3d",
    "LinfBatchNorm1d",
    "LinfBatchNorm2d",
    "LinfBatchNorm3d",
    "L1BatchNormNd",
    "LinfBatchNormNd",
    "L1BatchNormAct1d",
    "L1BatchNormAct2d",
    "L1BatchNormAct3d",
    "LinfBatchNormAct1d",
    "LinfBatchNormAct2d",
    "LinfBatchNormAct3d",
    "convert_batchnorm",
    "revert_batchnorm",
    "SyncL1BatchNorm",
    "SyncLinfBatchNorm",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "scale_invariant_parameters",
    "bounded_weight_norm",
    "WeightNormProjection",
    "NormScaledLR",
]
