"""Optimizer hooks that decouple the weight norm from the objective, on any ``torch.optim.Optimizer``.

- :class:`WeightNormProjection`: after every step, each output channel of the chosen weights back on its sphere.
- :class:`NormScaledLR`: each output channel's step rescaled by ``(‖w‖/ρ)^power``.

Both attach through torch's optimizer step hooks, so the optimizer, its state and LR schedulers stay the user's.

References: arXiv:1803.01814
"""

from .norm_scaled_lr import NormScaledLR, default_power
from .projection import WeightNormProjection

__all__ = ["NormScaledLR", "WeightNormProjection", "default_power"]
