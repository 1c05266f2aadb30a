"""Host launchers of the fused BatchNorm + activation on Triton: the batch-norm forward kernels, then the epilogue.

Used by :class:`normdecouple._act_backend.LpBatchNormActFunction` when the layer's backend resolves to Triton
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), for contiguous or channels_last input in full
precision statistics (``low_precision=False``); other calls take the Function's PyTorch path. The Function's
saved tensors and backward are the same on both paths; on this one the L1 input gradient is one kernel
(:func:`l1_input_grad`) that reads the packed signs, and the sum of the signs is the forward's own, so the
backward never unpacks them into a tensor.

References: arXiv:1803.01814
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import Norm, canonical, channel_major_abs_dev, is_channels_last, linf_top
from . import act_kernels, launch
from .plan import Spec, plan_act_forward, plan_l1_grad

__all__ = ["supports", "statistics", "l1_input_grad"]

_ACT_CODES = {"relu": act_kernels.RELU, "leaky_relu": act_kernels.LEAKY_RELU, "identity": act_kernels.IDENTITY}


def supports(x: Tensor, low_precision: bool) -> bool:
    """Whether this path serves ``x``: contiguous or channels_last, statistics not in the input dtype."""
    lowp = low_precision and x.dtype in (torch.float16, torch.bfloat16)
    return not lowp and (x.is_contiguous() or is_channels_last(x))


def statistics(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float,
               norm: Norm, k: int, activation: str, negative_slope: float):
    """``(y, mean, scale, inv_std, threshold, top, signs, has_zero, sign_sum)`` of the fused forward.

    y = act(BN(x) + residual) (the Triton batch-norm forward, then :func:`act_kernels.act_forward_kernel` in
    place); for L1 ``signs`` are the packed bits of x - mean > 0, ``has_zero`` the channels with a value at the
    mean and ``sign_sum`` the forward's per-channel sum of sign(x - mean) (int32); for L∞ ``top`` holds the
    sorted largest |d| of each channel (k + 1 of them) and their positions.
    """
    y, mean, scale, inv_std, threshold, sign_sum = launch.forward(x, weight, bias, eps, norm, k, False)
    channels_last = is_channels_last(x)
    view = canonical(x, channels_last)
    out = canonical(y, channels_last)
    l1 = norm is Norm.L1
    r = None if residual is None else canonical(residual, channels_last).contiguous()
    plan = plan_act_forward(Spec.of(out), mean.dtype, r is not None, _ACT_CODES[activation], l1,
                            float(negative_slope))
    tensors = {"y": out, "x": view, "mean": mean}
    if r is not None:
        tensors["r"] = r
    t = launch.execute(plan, tensors, x.device)
    top = None
    if not l1:
        c, n = view.shape[1], view.numel() // view.shape[1]
        top = linf_top(channel_major_abs_dev(view, mean), k, 1 if k < n else 0)
        threshold = threshold.clone()
    return (y, mean, scale, inv_std, (None if l1 else threshold), top, (t["bits"] if l1 else None),
            t["zero"].bool(), (sign_sum if l1 else None))


def l1_input_grad(dz: Tensor, signs: Tensor, a: Tensor, o: Tensor, k: Tensor) -> Tensor:
    """``dz * a + o + k * b`` per channel of the (A, C, B) tensor ``dz``, b the packed bits, in a's dtype."""
    dz = dz.contiguous()
    plan = plan_l1_grad(Spec.of(dz), a.dtype)
    dx = torch.empty(dz.shape, dtype=a.dtype, device=dz.device)
    tensors = {"dz": dz, "bits": signs, "dx": dx, "a": a.contiguous(), "o": o.contiguous(), "kc": k.contiguous()}
    launch.execute(plan, tensors, dz.device)
    return dx
