"""Plain reference of L1 and L∞ batch normalization: the formulas of PAPER.md §2, differentiated by autograd.

This is the test oracle. It is written directly from the definitions, shares no code with the fast backends
(only the constants), runs in whatever dtype it is given (use float64 for reference values) and is not meant
to be fast.

References: arXiv:1803.01814
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._constants import L1_SCALE, topk_constant
from .stats import Norm

__all__ = ["reference_batch_norm"]


def reference_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    norm: str | Norm = "l1",
    k: int = 1,
) -> Tensor:
    """L1 or L∞ (top-k) batch norm, written out op by op. Updates the running statistics in place.

    Training: ``y = (x - mu) / sqrt(s^2 + eps) * weight + bias`` with ``s = sqrt(pi/2) mean|x - mu|`` (L1) or
    ``s = mean(top-k |x - mu|) / c(n, k)`` (L∞); ``running_mean <- (1 - m) running_mean + m mu`` and
    ``running_var <- (1 - m) running_var + m s^2 n / (n - 1)``. Eval: torch's BatchNorm eval formula.
    """
    shape = [1, -1] + [1] * (input.dim() - 2)
    if not training:
        y = (input - running_mean.to(input.dtype).view(shape)) / torch.sqrt(
            running_var.to(input.dtype).view(shape) + eps
        )
    else:
        channels = input.shape[1]
        per_channel = input.transpose(0, 1).reshape(channels, -1)
        n = per_channel.shape[1]
        mu = per_channel.mean(dim=1, keepdim=True)
        dev = per_channel - mu
        if Norm.parse(norm) is Norm.L1:
            s = L1_SCALE * dev.abs().mean(dim=1)
        else:
            s = dev.abs().topk(k, dim=1).values.mean(dim=1) / topk_constant(n, k)
        y = (input - mu.view(shape)) / torch.sqrt(s.view(shape) ** 2 + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mu.view(-1).to(running_mean.dtype))
                unbiased = (s.detach() ** 2 * n / (n - 1)).to(running_var.dtype)
                running_var.mul_(1 - momentum).add_(momentum * unbiased)
    if weight is not None:
        y = y * weight.to(input.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(input.dtype).view(shape)
    return y
