r"""The PyTorch backend of L1 and L∞ batch normalization: statistics, normalisation and the closed-form backward.

Notation (one channel, n = N * spatial values): mean mu, deviations d = x - mu, scale s, s_e = sqrt(s^2 + eps),
x_hat = d / s_e, g = dL/dy * weight.

Forward (training):

* L1:  s = sqrt(pi/2) * mean|d|
* L∞:  s = mean of the k largest |d| / c(n, k); t, the k-th largest |d|, is kept for the backward
* y = x_hat * weight + bias, computed by torch's own fused (eval-mode) batch-norm kernel with the batch
  statistics (mu, s^2) standing in for the running ones, so layouts (NCHW, channels_last) and mixed
  dtypes are handled natively and no layout copy is made.

Backward: if ds/dd_i = a_i, then

    dx_i = (g_i - mean(g) - (s / s_e) * (sum_j g_j x_hat_j) * (a_i - mean(a))) / s_e

* L1:  a_i = sqrt(pi/2) * sign(d_i) / n                         (sign(0) = 0)
* L∞:  a_i = sign(d_i) * w_i / (k * c(n, k)), with the tie rule
       w_i = 1 if |d_i| > t, (k - #{|d| > t}) / #{|d| = t} if |d_i| = t, 0 otherwise:
       the k-th place is shared evenly by all values tied there, which is the average of the
       subgradients over every way of breaking the tie (and the plain top-k gradient when there is none).

Both are one reduction pass (sum(dy), sum(dy * x_hat) from torch's fused batch-norm backward, and the sums of
the sign terms) and one elementwise pass. Saved for backward: the input, the weight and per-channel vectors,
as torch's BatchNorm saves.

``low_precision=True`` computes every step of the statistics in the input dtype: a pairwise mean of means
(:func:`_tree_mean`, which halves at every level, so no partial result exceeds the largest input and the
count never enters the arithmetic), no squares (s_e by a scaled hypot), constants from float64 on the host.

References: arXiv:1803.01814
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._constants import L1_SCALE, topk_constant

__all__ = ["LpBatchNormFunction", "accumulate_dtype"]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and kept in: at least float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.compiler.assume_constant_result
def _topk_constant(n: int, k: int) -> float:
    # A compile-time constant for torch.compile: the (cached) integral is evaluated once per shape.
    return topk_constant(n, k)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _channel_major(x: Tensor) -> Tensor:
    """(C, n) view of the channel's values; a copy unless the batch dimension is 1."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _tree_mean(v: Tensor) -> Tensor:
    """Row means of a (C, n) tensor in its own dtype: a pairwise mean of means, halving at every level.

    Each level computes ``a * 0.5 + b * 0.5`` in ``v.dtype``, so no intermediate exceeds the largest |value|
    (a plain fp16 sum of a few hundred activations of 1e3 would overflow) and rounding errors grow with
    log2(n), not n. Zero padding to a power of two is undone by one multiplication with ``width / n``,
    a host constant in [1, 2).
    """
    n = v.shape[1]
    width = 1 << max(0, (n - 1).bit_length())
    if width != n:
        v = torch.nn.functional.pad(v, (0, width - n))
    while v.shape[1] > 1:
        v = v[:, 0::2] * 0.5 + v[:, 1::2] * 0.5
    return v[:, 0] * (width / n)


def _hypot(s: Tensor, root_eps: float) -> Tensor:
    """sqrt(s^2 + root_eps^2) in s's dtype without squaring anything larger than 1."""
    floor = torch.full_like(s, root_eps)
    hi = torch.maximum(s, floor)
    lo = torch.minimum(s, floor)
    ratio = lo / hi
    return hi * torch.sqrt(1.0 + ratio * ratio)


def _scale_from_deviations(abs_dev: Tensor, norm: str, k: int, n: int, lowp: bool) -> tuple[Tensor, Tensor | None]:
    """Scale s (and, for L∞, the k-th largest |d|) from |d| laid out as (C, n) (lowp) or as the input."""
    if norm == "l1":
        if lowp:
            return _tree_mean(abs_dev) * L1_SCALE, None
        return torch.linalg.vector_norm(abs_dev, 1, dim=_reduce_dims(abs_dev)) * (L1_SCALE / n), None
    inv_c = 1.0 / _topk_constant(n, k)
    if k == 1 and not lowp:
        top = abs_dev.amax(dim=_reduce_dims(abs_dev))
        return top * inv_c, top
    per_channel = abs_dev if lowp else _channel_major(abs_dev)
    top = per_channel.topk(k, dim=1, sorted=False).values
    threshold = top.amin(dim=1)
    mean_top = _tree_mean(top) if lowp else top.mean(dim=1)
    return mean_top * inv_c, threshold


def _forward_full(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: str, k: int, n: int):
    acc = accumulate_dtype(x.dtype)
    dims = _reduce_dims(x)
    mean = x.mean(dim=dims, dtype=acc)
    abs_dev = (x - _per_channel(mean, x)).abs_()
    scale, threshold = _scale_from_deviations(abs_dev, norm, k, n, lowp=False)
    del abs_dev
    scale_sq = scale * scale
    inv_std = torch.rsqrt(scale_sq + eps)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    # torch's eval-mode kernel computes (x - mean) / sqrt(var + eps) * w + b in one fused pass.
    y = torch.batch_norm(x, w, b, mean, scale_sq, False, 0.0, eps, torch.backends.cudnn.enabled)
    return y, mean, scale, inv_std, None, threshold


def _forward_lowp(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: str, k: int, n: int):
    dtype = x.dtype
    per_channel = _channel_major(x)
    mean = _tree_mean(per_channel)
    abs_dev = (per_channel - mean[:, None]).abs()
    scale, threshold = _scale_from_deviations(abs_dev, norm, k, n, lowp=True)
    del abs_dev
    scale_e = _hypot(scale, math.sqrt(eps))
    mult = 1.0 / scale_e if weight is None else weight.to(dtype) / scale_e
    y = (x - _per_channel(mean, x)) * _per_channel(mult, x)
    if bias is not None:
        y = y + _per_channel(bias.to(dtype), x)
    acc = accumulate_dtype(dtype)
    inv_std = 1.0 / scale_e.to(acc)
    return y, mean.to(acc), scale.to(acc), inv_std, mean, threshold


class LpBatchNormFunction(torch.autograd.Function):
    """Training-mode L1/L∞ batch norm with the closed-form backward of the module docstring.

    ``apply(x, weight, bias, eps, norm, k, low_precision)`` returns ``(y, batch_mean, batch_scale, inv_std,
    lowp_mean, threshold)``: the statistics are in :func:`accumulate_dtype` and carry no gradient (running
    statistics are updated by the caller, never here); ``lowp_mean`` is the mean in the input dtype that the
    low-precision deviations were taken from (else None) and ``threshold`` the k-th largest |d| (L∞, else
    None), both kept so that the backward recomputes exactly the forward's deviations.
    """

    @staticmethod
    def forward(x, weight, bias, eps, norm, k, low_precision):
        n = x.numel() // x.shape[1]
        forward = _forward_lowp if low_precision and x.dtype in (torch.float16, torch.bfloat16) else _forward_full
        return forward(x, weight, bias, eps, norm, k, n)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps, norm, k, low_precision = inputs
        y, batch_mean, scale, inv_std, lowp_mean, threshold = output
        ctx.norm, ctx.k = norm, k
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, batch_mean, scale, inv_std, lowp_mean, threshold)
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))

    @staticmethod
    def backward(ctx, grad_y, *unused):
        x, weight, batch_mean, scale, inv_std, lowp_mean, threshold = ctx.saved_tensors
        acc = inv_std.dtype
        n = x.numel() // x.shape[1]
        dims = _reduce_dims(x)
        # One fused reduction pass: sum(dy * x_hat) and sum(dy), in at least float32.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, None, None, None, batch_mean, inv_std, True, 0.0, [False, True, True]
        )
        gamma = torch.ones_like(inv_std) if weight is None else weight.to(acc)
        mean_g = gamma * sum_dy / n
        mean_g_xhat = gamma * sum_dy_xhat / n
        ratio = scale * inv_std
        dev = x - _per_channel(batch_mean if lowp_mean is None else lowp_mean, x)
        sign = torch.sign(dev)
        if ctx.norm == "l1":
            # a_i = sqrt(pi/2) sign(d_i) / n
            coef = -ratio * inv_std * mean_g_xhat * L1_SCALE
            u = sign
        else:
            # a_i = sign(d_i) w_i / (k c): the k-th place shared evenly by the values tied at t.
            abs_dev = dev.abs()
            thr = _per_channel(threshold, x)
            above = abs_dev > thr
            tied = abs_dev == thr
            n_above = above.sum(dim=dims, dtype=acc)
            n_tied = tied.sum(dim=dims, dtype=acc)
            tie_share = (ctx.k - n_above) / n_tied
            u = sign.to(acc) * (above.to(acc) + tied.to(acc) * _per_channel(tie_share, x))
            coef = -ratio * inv_std * mean_g_xhat * (n / (ctx.k * _topk_constant(n, ctx.k)))
        mean_u = u.mean(dim=dims, dtype=acc)
        offset = -(mean_g * inv_std) - coef * mean_u
        grad_x = torch.addcmul(_per_channel(offset, x), u, _per_channel(coef, x))
        grad_x = grad_x.addcmul_(grad_y, _per_channel(gamma * inv_std, x)).to(x.dtype)
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None
