"""Optimizer hooks that decouple the weight norm from the objective, on any ``torch.optim.Optimizer``.

- :class:`WeightNormProjection`: after every step, each output channel of the chosen weights back on its sphere.
- :class:`NormScaledLR`: each output channel's step rescaled by ``(‖w‖/ρ)^power``.

Both attach through torch's optimizer step hooks, so the optimizer, its state and LR schedulers stay the user's.
:mod:`normdecouple.optim.checks` holds their argument checks, shared with the Lightning callbacks;
:func:`output_channel_dim` says which dimension of a module's weight indexes its output channels.

References: arXiv:1803.01814
"""

from . import checks
from ._common import output_channel_dim
from .norm_scaled_lr import NormScaledLR, default_power
from .projection import WeightNormProjection

__all__ = ["NormScaledLR", "WeightNormProjection", "checks", "default_power", "output_channel_dim"]
