"""``TritonLpBatchNormFunction``: the Triton kernels behind the same autograd interface as the PyTorch backend.

Why custom ops inside an ``autograd.Function``. The launchers do host-side work that dynamo cannot trace
(choosing tiles from the device, building constant tensors, c(n, k) from a cached integral, launching
through the Triton interpreter on CPU tensors), so each direction is a ``torch.library.custom_op``
(``normdecouple::triton_lp_bn_forward`` and ``normdecouple::triton_lp_bn_backward``) with a fake
implementation that gives shapes, dtypes and strides. ``torch.compile`` keeps them as opaque calls in the
graph (also with symbolic batch sizes: n and c(n, k) are computed inside the op at run time), and the
``autograd.Function`` around them, which dynamo traces like the PyTorch backend's, wires the backward. This
keeps the kernel -> launcher -> Function split, and the Function's ``apply`` has the exact signature and
outputs of :class:`normdecouple._torch_backend.LpBatchNormFunction`, so the dispatcher can pick either.

References: arXiv:1803.01814
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._torch_backend import backward_with_graph
from ..stats import Norm, accumulate_dtype
from . import launch

__all__ = ["TritonLpBatchNormFunction"]


@torch.library.custom_op("normdecouple::triton_lp_bn_forward", mutates_args=())
def _forward_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: str, k: int, low_precision: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launch.forward(x, weight, bias, eps, Norm(norm), k, low_precision)


@_forward_op.register_fake
def _(x, weight, bias, eps, norm, k, low_precision):
    c = x.shape[1]
    acc = accumulate_dtype(x.dtype)
    per_channel = [x.new_empty(c, dtype=acc) for _ in range(3)]
    l1 = Norm(norm) is Norm.L1
    threshold = x.new_empty(0 if l1 else c, dtype=acc)
    sign_sum = x.new_empty(c if l1 else 0, dtype=torch.int32)
    return (torch.empty_like(x), *per_channel, threshold, sign_sum)


@torch.library.custom_op("normdecouple::triton_lp_bn_backward", mutates_args=())
def _backward_op(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, scale: Tensor, inv_std: Tensor,
    threshold: Tensor, sign_sum: Tensor, norm: str, k: int, low_precision: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return launch.backward(grad_y, x, weight, mean, scale, inv_std, threshold, sign_sum, Norm(norm), k,
                           low_precision)


@_backward_op.register_fake
def _(grad_y, x, weight, mean, scale, inv_std, threshold, sign_sum, norm, k, low_precision):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


class TritonLpBatchNormFunction(torch.autograd.Function):
    """Training-mode L1/L∞ batch norm on the Triton kernels, a drop-in for ``LpBatchNormFunction``.

    ``apply(x, weight, bias, eps, norm, k, low_precision)`` (``norm`` a ``Norm`` or its value) returns
    ``(y, batch_mean, batch_scale)``, the statistics in float32 (float64 for float64 input) and without gradient; running statistics are never
    touched here. The backward keeps the input, the weight and per-channel vectors: mu, s, 1/s_e and for L∞
    the k-th largest |d| (tie rule), for L1 the sum of sign(d). With ``create_graph=True`` the backward is
    :func:`normdecouple._torch_backend.backward_with_graph` (differentiable again).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, norm, k, low_precision):
        norm = Norm.parse(norm)
        weight_k = None if weight is None else weight.contiguous()
        bias_k = None if bias is None else bias.contiguous()
        y, mean, scale, inv_std, threshold, sign_sum = _forward_op(
            x, weight_k, bias_k, eps, norm.value, k, low_precision
        )
        ctx.norm, ctx.k, ctx.eps, ctx.low_precision = norm, k, eps, low_precision
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight_k, mean, scale, inv_std, threshold, sign_sum)
        ctx.mark_non_differentiable(mean, scale)
        return y, mean, scale

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_scale):
        x, weight, mean, scale, inv_std, threshold, sign_sum = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the kernels' backward is not differentiable; the PyTorch path's is.
            return backward_with_graph(ctx, grad_y, x, weight) + (None,) * 4
        grad_x, sum_dy_xhat, sum_dy = _backward_op(
            grad_y, x, weight, mean, scale, inv_std, threshold, sign_sum, ctx.norm.value, ctx.k, ctx.low_precision
        )
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None
