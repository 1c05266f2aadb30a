"""normdecouple: the normalization schemes of *Norm matters* (Hoffer, Banner, Golan, Soudry, NeurIPS 2018).

L1 and L-infinity batch normalization as drop-in replacements for torch's BatchNorm, converters between them,
and optimizer hooks that decouple the weight norm from the objective.

References: arXiv:1803.01814
"""

from .batchnorm import (
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
)
from .convert import convert_batchnorm, revert_batchnorm

__version__ = "0.1.0"

__all__ = [
    "L1BatchNorm1d",
    "L1BatchNorm2d",
    "L1BatchNorm3d",
    "LinfBatchNorm1d",
    "LinfBatchNorm2d",
    "LinfBatchNorm3d",
    "convert_batchnorm",
    "revert_batchnorm",
]
