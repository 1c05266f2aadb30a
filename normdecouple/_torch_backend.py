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

__all__ = ["LpBatchNormFunction", "accumulate_dtype", "linf_selected", "normalise"]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and kept in: at least float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.custom_op("normdecouple::topk_constant", mutates_args=())
def _topk_constant_op(n: int, k: int) -> Tensor:
    return torch.tensor(topk_constant(n, k), dtype=torch.float64)


@_topk_constant_op.register_fake
def _(n: int, k: int) -> Tensor:
    return torch.empty((), dtype=torch.float64)


def _topk_constant(n: int, k: int) -> float | Tensor:
    # Under torch.compile n may be symbolic (dynamic batch sizes), so the cached integral is called through a
    # custom op at run time; eagerly it is a plain float.
    if torch.compiler.is_compiling():
        return _topk_constant_op(n, k)
    return topk_constant(n, k)


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _canonical(x: Tensor, channels_last: bool) -> Tensor:
    """A 3-D (A, C, B) view of ``x`` with contiguous memory: (N, C, spatial) or, for channels_last, (N*spatial, C, 1).

    Elementwise ops with a (1, C, 1) per-channel vector and reductions over dims (0, 2) run several times
    faster on this view than on the 4-D/5-D tensor; ``reshape`` copies only for other, rarer layouts.
    """
    if channels_last:
        return x.movedim(1, -1).reshape(-1, x.shape[1], 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _uncanonical(v: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    if channels_last:
        return v.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return v.view(shape)


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
    """Scale s (and, for L∞, the k-th largest |d|) from |d| laid out as (C, n) (lowp) or (A, C, B)."""
    if norm == "l1":
        if lowp:
            return _tree_mean(abs_dev) * L1_SCALE, None
        return abs_dev.sum(dim=(0, 2)) * (L1_SCALE / n), None
    inv_c = 1.0 / _topk_constant(n, k)
    per_channel = abs_dev if lowp else _channel_major(abs_dev)
    top = per_channel.topk(k, dim=1, sorted=False).values
    threshold = top.amin(dim=1)
    mean_top = _tree_mean(top) if lowp else top.mean(dim=1)
    return mean_top * inv_c, threshold


def normalise(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, scale: Tensor, eps: float, lowp: bool
) -> tuple[Tensor, Tensor]:
    """y = (x - mean) / sqrt(s^2 + eps) * weight + bias, and 1/s_e in :func:`accumulate_dtype`.

    Full precision: torch's own fused eval-mode kernel with (mean, s^2) standing in for the running statistics
    (one pass, any layout, mixed dtypes). Low precision: elementwise ops in the input dtype and a square-free
    s_e. Shared by the unsynchronised and the synchronised (``distributed``) paths.
    """
    acc = accumulate_dtype(x.dtype)
    if not lowp:
        scale_sq = scale * scale
        inv_std = torch.rsqrt(scale_sq + eps)
        if x.numel() == 0:
            return torch.empty_like(x), inv_std
        w = None if weight is None else weight.to(acc)
        b = None if bias is None else bias.to(acc)
        y = torch.batch_norm(x, w, b, mean, scale_sq, False, 0.0, eps, torch.backends.cudnn.enabled)
        return y, inv_std
    scale_e = _hypot(scale, math.sqrt(eps))
    inv_std = 1.0 / scale_e.to(acc)
    if x.numel() == 0:
        return torch.empty_like(x), inv_std
    mult = 1.0 / scale_e if weight is None else weight.to(x.dtype) / scale_e
    y = (x - _per_channel(mean, x)) * _per_channel(mult, x)
    if bias is not None:
        y = y + _per_channel(bias.to(x.dtype), x)
    return y, inv_std


def _forward_full(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: str, k: int, n: int):
    acc = accumulate_dtype(x.dtype)
    view = _canonical(x, _is_channels_last(x))
    mean = view.mean(dim=(0, 2), dtype=acc)
    if norm == "linf" and k == 1:
        # max|x - mu| = max(max(x) - mu, mu - min(x)): two reductions, no deviations in memory. Rounding is
        # monotone, so this equals the largest |fl(x - mu)| that the backward recomputes.
        top = torch.maximum(view.amax(dim=(0, 2)).to(acc) - mean, mean - view.amin(dim=(0, 2)).to(acc))
        scale, threshold = top / _topk_constant(n, 1), top
    else:
        abs_dev = (view - mean[:, None]).abs_()
        scale, threshold = _scale_from_deviations(abs_dev, norm, k, n, lowp=False)
        del abs_dev
    y, inv_std = normalise(x, weight, bias, mean, scale, eps, lowp=False)
    return y, mean, scale, inv_std, None, threshold


def _forward_lowp(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: str, k: int, n: int):
    per_channel = _channel_major(x)
    mean = _tree_mean(per_channel)
    abs_dev = (per_channel - mean[:, None]).abs()
    scale, threshold = _scale_from_deviations(abs_dev, norm, k, n, lowp=True)
    del abs_dev
    y, inv_std = normalise(x, weight, bias, mean, scale, eps, lowp=True)
    acc = accumulate_dtype(x.dtype)
    return y, mean.to(acc), scale.to(acc), inv_std, mean, threshold


def _linf_scale_term_dense(dev: Tensor, threshold: Tensor, k: int, acc: torch.dtype) -> Tensor:
    """u_i = sign(d_i) w_i of the L∞ backward for every value (a_i = u_i / (k c)), as one dense tensor.

    The tie rule: w_i = 1 above the k-th largest |d| (t), (k - #above) / #tied on the values tied at t, 0
    below. On the tied values sign(d) = d / t, which saves a pass; t = 0 means every d is 0, and so is u.
    """
    abs_dev = dev.abs()
    thr = threshold.to(abs_dev.dtype)[:, None]
    tied = abs_dev == thr
    n_tied = tied.sum(dim=(0, 2)).to(acc)
    above = None
    if k == 1:
        share = 1.0 / n_tied
    else:
        above = abs_dev > thr
        share = (k - above.sum(dim=(0, 2)).to(acc)) / n_tied
    del abs_dev
    t = threshold.to(acc)
    per_unit = torch.where(t > 0, share / t, torch.zeros_like(t))[:, None]
    u = torch.where(tied, dev * per_unit, 0.0)
    if above is not None:
        u = torch.where(above, dev.sign().to(acc), u)
    return u


def linf_selected(
    view: Tensor, dev_mean: Tensor, threshold: Tensor, acc: torch.dtype
) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """The values with |d| >= t > 0: their indices into the (A, C, B) ``view``, sign(d), and whether |d| > t.

    Only these carry the L∞ scale's gradient (about k per channel), so everything after the one comparison
    pass is tiny. d is recomputed with the forward's exact operation, so the comparisons with t are
    bit-for-bit the forward's. t = 0 (a constant channel, e.g. a dead ReLU) has no scale gradient anywhere,
    so nothing is selected there. Needs ``nonzero``, a host sync: compiled graphs use the dense form.
    """
    abs_dev = (view - dev_mean[:, None]).abs_()
    thr = threshold.to(abs_dev.dtype)
    select_from = torch.where(thr > 0, thr, torch.full_like(thr, float("inf")))
    index = torch.nonzero(abs_dev >= select_from[:, None], as_tuple=True)
    del abs_dev
    d_selected = view[index] - dev_mean[index[1]]
    above = d_selected.abs() > thr[index[1]]
    return index, torch.sign(d_selected).to(acc), above


def _linf_scale_term_sparse(
    view: Tensor, dev_mean: Tensor, threshold: Tensor, k: int, acc: torch.dtype
) -> tuple[tuple[tuple[Tensor, ...], Tensor], Tensor]:
    """The same u as :func:`_linf_scale_term_dense` on the values :func:`linf_selected` picks (eager mode).

    Returns ``((index, u_selected), sum_u)``: indices into the (A, C, B) view, u at those indices, and the
    per-channel sum of u.
    """
    index, sign_selected, above = linf_selected(view, dev_mean, threshold, acc)
    channel = index[1]
    channels = threshold.shape[0]
    n_above = torch.zeros(channels, dtype=acc, device=view.device).index_add_(0, channel, above.to(acc))
    n_tied = torch.zeros(channels, dtype=acc, device=view.device).index_add_(0, channel, (~above).to(acc))
    share = (k - n_above) / n_tied
    u_selected = sign_selected * torch.where(above, torch.ones_like(share[channel]), share[channel])
    sum_u = torch.zeros(channels, dtype=acc, device=view.device).index_add_(0, channel, u_selected)
    return (index, u_selected), sum_u


class LpBatchNormFunction(torch.autograd.Function):
    """Training-mode L1/L∞ batch norm with the closed-form backward of the module docstring.

    ``apply(x, weight, bias, eps, norm, k, low_precision)`` returns ``(y, batch_mean, batch_scale)``; the
    statistics are in :func:`accumulate_dtype` and carry no gradient (running statistics are updated by the
    caller, never here). Besides the input and weight, the backward keeps per-channel vectors only: the mean,
    1/s_e, s, and for L∞ the k-th largest |d| (for the tie rule); in low precision also the mean in the input
    dtype, so that it recomputes exactly the forward's deviations.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, norm, k, low_precision):
        n = x.numel() // x.shape[1]
        lowp = low_precision and x.dtype in (torch.float16, torch.bfloat16)
        forward = _forward_lowp if lowp else _forward_full
        y, batch_mean, scale, inv_std, lowp_mean, threshold = forward(x, weight, bias, eps, norm, k, n)
        ctx.norm, ctx.k = norm, k
        ctx.channels_last = _is_channels_last(x)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, batch_mean, scale, inv_std, lowp_mean, threshold)
        ctx.mark_non_differentiable(batch_mean, scale)
        return y, batch_mean, scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_mean, grad_scale):
        x, weight, batch_mean, scale, inv_std, lowp_mean, threshold = ctx.saved_tensors
        acc = inv_std.dtype
        n = x.numel() // x.shape[1]
        # grad_y in x's layout: the canonical view below needs it anyway (a copy only when they differ), and
        # torch's CPU reduction loses precision on mixed layouts in bf16 (errors of ~1e-3 relative measured).
        if ctx.channels_last:
            grad_y = _uncanonical(_canonical(grad_y, True), x.shape, True)
        elif x.is_contiguous():
            grad_y = grad_y.contiguous()
        # One fused reduction pass: sum(dy * x_hat) and sum(dy), in at least float32.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, None, None, None, batch_mean, inv_std, True, 0.0, [False, True, True]
        )
        gamma = torch.ones_like(inv_std) if weight is None else weight.to(acc)
        mean_g = gamma * sum_dy / n
        mean_g_xhat = gamma * sum_dy_xhat / n
        ratio = scale * inv_std
        channels_last = ctx.channels_last
        view = _canonical(x, channels_last)
        dev_mean = batch_mean if lowp_mean is None else lowp_mean
        sparse = None
        if ctx.norm == "l1":
            # a_i = sqrt(pi/2) sign(d_i) / n
            coef = -ratio * inv_std * mean_g_xhat * L1_SCALE
            u = (view - dev_mean[:, None]).sign_()
            sum_u = u.sum(dim=(0, 2), dtype=acc)
        else:
            coef = -ratio * inv_std * mean_g_xhat * (n / (ctx.k * _topk_constant(n, ctx.k)))
            if torch.compiler.is_compiling():
                u = _linf_scale_term_dense(view - dev_mean[:, None], threshold, ctx.k, acc)
                sum_u = u.sum(dim=(0, 2), dtype=acc)
            else:
                sparse, sum_u = _linf_scale_term_sparse(view, dev_mean, threshold, ctx.k, acc)
        offset = -(mean_g * inv_std) - coef * (sum_u / n)
        dy = _canonical(grad_y, channels_last)
        if sparse is None:
            grad_x = torch.addcmul(offset[:, None], u, coef[:, None])
            grad_x.addcmul_(dy, (gamma * inv_std)[:, None])
        else:
            # Only the values at or above the k-th largest |d| carry the scale's gradient.
            grad_x = torch.addcmul(offset[:, None], dy, (gamma * inv_std)[:, None])
            index, u_selected = sparse
            grad_x.index_put_(index, coef[index[1]] * u_selected, accumulate=True)
        grad_x = _uncanonical(grad_x, x.shape, channels_last).to(x.dtype)
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None
