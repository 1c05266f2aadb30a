"""Host launchers of the fused BatchNorm + activation on Triton: the batch-norm forward kernels, then the epilogue.

Used by :class:`normdecouple._act_backend.LpBatchNormActFunction` when the layer's backend resolves to Triton
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), for contiguous or channels_last input in full
precision statistics (``low_precision=False``); other calls take the Function's PyTorch path. The Function's
saved tensors and backward are the same on both paths; on this one the L1 input gradient is one kernel
(:func:`l1_input_grad`).

References: arXiv:1803.01814
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..stats import Norm, canonical, channel_major_abs_dev, is_channels_last, linf_top
from . import act_kernels, launch

__all__ = ["supports", "statistics", "l1_input_grad"]

#: Bytes of packed signs (8 values each) per program.
BLOCK = 128

_ACT_CODES = {"relu": act_kernels.RELU, "leaky_relu": act_kernels.LEAKY_RELU, "identity": act_kernels.IDENTITY}


def supports(x: Tensor, low_precision: bool) -> bool:
    """Whether this path serves ``x``: contiguous or channels_last, statistics not in the input dtype."""
    lowp = low_precision and x.dtype in (torch.float16, torch.bfloat16)
    return not lowp and (x.is_contiguous() or is_channels_last(x))


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    return launch.TL_DTYPES[torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype]


def statistics(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float,
               norm: Norm, k: int, activation: str, negative_slope: float):
    """``(y, mean, scale, inv_std, threshold, top, signs, has_zero)`` of the fused forward.

    y = act(BN(x) + residual) (the Triton batch-norm forward, then :func:`act_kernels.act_forward_kernel` in
    place); for L1 ``signs`` are the packed bits of x > mean and ``has_zero`` the channels with a value at the
    mean; for L∞ ``top`` holds the sorted largest |d| of each channel (k + 1 of them) and their positions.
    """
    y, mean, scale, inv_std, threshold, _ = launch.forward(x, weight, bias, eps, norm, k, False)
    channels_last = is_channels_last(x)
    view = canonical(x, channels_last)
    out = canonical(y, channels_last)
    numel, c, inner = view.numel(), view.shape[1], view.shape[2]
    l1 = norm is Norm.L1
    r = None if residual is None else canonical(residual, channels_last).contiguous()
    signs = torch.empty((numel + 7) // 8 if l1 else 0, dtype=torch.uint8, device=x.device)
    zero = torch.zeros(c if l1 else 0, dtype=torch.int32, device=x.device)
    acc = launch.TL_DTYPES[mean.dtype]
    act_kernels.act_forward_kernel[(triton.cdiv(numel, 8 * BLOCK),)](
        out, out if r is None else r, view, mean, signs if l1 else out, zero if l1 else mean,
        numel, c, inner, float(negative_slope),
        HAS_R=r is not None, ACT=_ACT_CODES[activation], SIGNS=l1, DT=launch.TL_DTYPES[x.dtype],
        COMPUTE=_compute_dtype(x.dtype), ACC=acc,
        BLOCK=BLOCK,
    )
    top = None
    if not l1:
        n = numel // c
        top = linf_top(channel_major_abs_dev(view, mean), k, 1 if k < n else 0)
        threshold = threshold.clone()
    return y, mean, scale, inv_std, (None if l1 else threshold), top, (signs if l1 else None), zero.bool()


def l1_input_grad(dz: Tensor, signs: Tensor, a: Tensor, o: Tensor, k: Tensor) -> Tensor:
    """``dz * a + o + k * b`` per channel of the (A, C, B) tensor ``dz``, b the packed bits, in a's dtype."""
    dz = dz.contiguous()
    numel, c, inner = dz.numel(), dz.shape[1], dz.shape[2]
    dx = torch.empty(dz.shape, dtype=a.dtype, device=dz.device)
    act_kernels.l1_grad_kernel[(triton.cdiv(numel, 8 * BLOCK),)](
        dz, signs, dx, a.contiguous(), o.contiguous(), k.contiguous(), numel, c, inner,
        ACC=launch.TL_DTYPES[a.dtype], BLOCK=BLOCK,
    )
    return dx
