r"""The PyTorch backend of L1 and L∞ batch normalization: the training forward and its closed-form backward.

The math (scales, tie rule, input gradient) is in :mod:`normdecouple.stats`; this module runs it with torch
ops. Forward (training, :func:`training_forward`): mu and the scale s per channel (:func:`~normdecouple.stats.l1_scale`;
for L∞ the k + ``TOPK_SPARE`` largest |d| and their positions, :func:`~normdecouple.stats.linf_top`), then
``y = x_hat * weight + bias`` by torch's own fused (eval-mode) batch-norm kernel with the batch statistics
(mu, s^2) standing in for the running ones, so layouts (NCHW, channels_last) and mixed dtypes are handled
natively. Low precision: the pairwise means read one transposed copy of the input, and y is computed
elementwise in the input dtype (see :func:`normalise`).

Backward (first order, :class:`LpBatchNormFunction`): one reduction pass (sum(dy) and sum(dy * x_hat) from
torch's fused batch-norm backward), then for L1 u = sign(d), its sums and the elementwise gradient
(:func:`~normdecouple.stats.input_grad`, three passes over u, written in place); for L∞ one elementwise pass
(``dy * gamma / s_e + offset``) plus the few values at or above the k-th largest |d|, read from the forward's
candidates (a scan of the input only when more values tie with the k-th than the candidates hold). Saved for
backward: the input, the weight and per-channel vectors, as torch's BatchNorm saves (for L∞ also the (C, k +
``TOPK_SPARE``) candidates).

Higher order (``create_graph=True``), ``torch.func`` transforms, forward-mode AD and ``torch.jit.trace`` use
:func:`differentiable_batch_norm`, the same forward written with differentiable torch ops whose derivative is
the closed form above (the L∞ tie weights enter as constants, so its gradient is exactly the tie rule): the
first-order backward recomputes it from the saved input and differentiates it with the graph kept. The
first-order backward also runs under ``vmap`` (batched gradients), where it avoids ``out=`` ops and the fused
kernels whose batching rules are missing (:func:`~normdecouple.stats.vmapped`).

References: arXiv:1803.01814
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._constants import L1_SCALE
from .stats import (
    Norm,
    accumulate_dtype,
    can_read_on_host,
    canonical,
    channel_major,
    channel_major_abs_dev,
    channel_sums,
    computes_in_input_dtype,
    grad_sums,
    hypot_eps,
    input_grad,
    input_grad_coefficients,
    is_channels_last,
    l1_scale,
    linf_selected,
    linf_selected_from_top,
    linf_tie_weights,
    linf_top,
    linf_top_of_input,
    linf_top_scale,
    pairwise_channel_mean,
    pairwise_mean_and_abs_dev,
    pairwise_mean_keeping_rows,
    per_channel,
    scale_factor,
    topk_constant_of_input,
    uncanonical,
    vmapped,
)

__all__ = [
    "LpBatchNormFunction",
    "training_forward",
    "normalise",
    "differentiable_batch_norm",
    "backward_with_graph",
]


def normalise(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, scale: Tensor, eps: float, lowp: bool,
    centred: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """y = (x - mean) / sqrt(s^2 + eps) * weight + bias, and 1/s_e in :func:`accumulate_dtype`.

    Full precision: torch's own fused eval-mode kernel with (mean, s^2) standing in for the running statistics
    (one pass, any layout, mixed dtypes). Low precision: elementwise ops in the input dtype (each rounded to it,
    in place after the first) and a square-free s_e. Shared by the unsynchronised and the synchronised
    (``distributed``) paths. ``centred`` (low precision only): ``x - mean`` already computed in x's shape, which
    is then overwritten with y.
    """
    acc = accumulate_dtype(x.dtype)
    if not lowp:
        scale_sq = scale * scale
        inv_std = torch.rsqrt(scale_sq + eps)
        if x.numel() == 0:
            return torch.empty_like(x), inv_std
        w = None if weight is None else weight.to(acc)
        b = None if bias is None else bias.to(acc)
        # The statistics stand in for running ones, which torch's kernel refuses to differentiate; callers
        # are autograd.Functions with their own backward (detached is exact here, also when export traces it).
        y = torch.batch_norm(x, w, b, mean.detach(), scale_sq.detach(), False, 0.0, eps,
                             torch.backends.cudnn.enabled)
        return y, inv_std
    scale_e = hypot_eps(scale, math.sqrt(eps))
    inv_std = 1.0 / scale_e.to(acc)
    if x.numel() == 0:
        return torch.empty_like(x), inv_std
    mult = 1.0 / scale_e if weight is None else weight.to(x.dtype) / scale_e
    y = (x - per_channel(mean, x) if centred is None else centred).mul_(per_channel(mult, x))
    if bias is not None:
        y = y.add_(per_channel(bias.to(x.dtype), x))
    return y, inv_std


#: Candidates kept beyond the k largest |d| of each channel in the L∞ forward, so that the backward finds every
#: value tied with the k-th largest among them (:func:`~normdecouple.stats.linf_selected_from_top`) instead of
#: scanning the input again. More ties than this (rare, more frequent in bf16) fall back to the scan.
TOPK_SPARE = 4


def training_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: Norm, k: int,
                     n: int, lowp: bool):
    """The training forward: ``(y, mean, scale, inv_std, lowp_mean, threshold, top)``.

    mean and scale in :func:`accumulate_dtype`; ``lowp_mean`` the mean in the input dtype (low precision only);
    ``threshold`` t and ``top`` (the L∞ candidates of :func:`~normdecouple.stats.linf_top`: sorted values and
    their positions in the channel-major row) for L∞ only. Every statistic is computed on the (A, C, B) view of
    the input (:func:`~normdecouple.stats.canonical`); L∞'s candidates come from block maxima of the input
    (:func:`~normdecouple.stats.linf_top_of_input`), or, for dimensions without a suitable block, from |d|
    written channel-major by the subtraction itself.
    """
    acc = accumulate_dtype(x.dtype)
    channels_last = is_channels_last(x)
    view = canonical(x, channels_last)
    threshold = top = None
    if not lowp:
        mean = channel_sums(view, acc) / n
        if norm is Norm.L1:
            scale = l1_scale((view - mean[:, None]).abs_(), n, lowp=False)
    elif norm is Norm.L1:
        mean, mean_abs_dev = pairwise_mean_and_abs_dev(view)
        scale = mean_abs_dev * L1_SCALE  # l1_scale's low-precision arithmetic, from the shared transposed copy
    else:
        mean, rows = pairwise_mean_keeping_rows(view)
        # The transposed copy is the (n, C, 1) view of a channels_last input: L∞'s candidates from its blocks.
        top = linf_top_of_input(rows[:, :, None], mean, k, TOPK_SPARE)
        del rows
    # Low precision normalises d = x - mean elementwise: computed once, for L∞'s |d| and for y. It is computed in
    # x's shape and layout because y is written over it: the output of an autograd.Function must not be a view
    # (an in-place op after the layer, e.g. `out += identity` or ReLU(inplace=True), would be refused).
    centred = x - per_channel(mean, x) if lowp else None
    dev = canonical(centred, channels_last) if lowp else None
    if norm is Norm.LINF:
        if top is None:
            top = linf_top_of_input(view, mean, k, TOPK_SPARE)
        if top is None:
            rows = channel_major_abs_dev(view, mean, dev)
            top = linf_top(rows, k, TOPK_SPARE)
            del rows
        scale, threshold = linf_top_scale(top[0], n, k, lowp)
    y, inv_std = normalise(x, weight, bias, mean, scale, eps, lowp, centred)
    if lowp:
        return y, mean.to(acc), scale.to(acc), inv_std, mean, threshold, top
    return y, mean, scale, inv_std, None, threshold, top


def _scale_shift(v: Tensor, mult: Tensor, shift: Tensor) -> Tensor:
    """``v * mult + shift`` per channel of an (A, C, B) view, in v's dtype: torch's eval-mode batch-norm kernel
    (statistics 0 and 1, eps 0), one pass at any layout and one rounding for half inputs with float32 vectors.
    Under ``vmap`` over the backward (whose rule for that kernel refuses mixed dtypes) the same in plain ops."""
    if vmapped(v):
        return (v.to(mult.dtype) * mult[:, None] + shift[:, None]).to(v.dtype)
    zeros = torch.zeros_like(mult)
    return torch.batch_norm(v, mult, shift, zeros, torch.ones_like(mult), False, 0.0, 0.0, False)


def _sum_u_sparse(view: Tensor, dev_mean: Tensor, threshold: Tensor, k: int, acc: torch.dtype,
                  top: tuple[Tensor, Tensor] | None = None):
    """The L∞ u = sign(d) w on the few values with |d| >= t (eager mode).

    They are read from the forward's candidates (:func:`~normdecouple.stats.linf_selected_from_top`) or, when
    more values tie with the k-th than the candidates hold, found by a scan
    (:func:`~normdecouple.stats.linf_selected`). Returns ``(index, u_selected, sum_u)``: indices into the
    (A, C, B) view, u there, and u's channel sums.
    """
    selected = None if top is None else linf_selected_from_top(view, dev_mean, threshold, *top, acc)
    if selected is None:
        selected = linf_selected(view, dev_mean, threshold, acc)
    index, sign_selected, above = selected
    channel = index[1]
    channels = threshold.shape[0]
    n_above = torch.zeros(channels, dtype=acc, device=view.device).index_add_(0, channel, above.to(acc))
    n_tied = torch.zeros(channels, dtype=acc, device=view.device).index_add_(0, channel, (~above).to(acc))
    share = (k - n_above) / n_tied
    u_selected = sign_selected * torch.where(above, torch.ones_like(share[channel]), share[channel])
    sum_u = torch.zeros(channels, dtype=acc, device=view.device).index_add_(0, channel, u_selected)
    return index, u_selected, sum_u


class LpBatchNormFunction(torch.autograd.Function):
    """Training-mode L1/L∞ batch norm with the closed-form backward of :mod:`normdecouple.stats`.

    ``apply(x, weight, bias, eps, norm, k, low_precision)`` (``norm`` a :class:`~normdecouple.stats.Norm` or its
    value)
    returns ``(y, batch_mean, batch_scale)``; the statistics are in :func:`accumulate_dtype` and carry no
    gradient (running statistics are updated by the caller, never here). Besides the input and weight, the
    backward keeps per-channel vectors only: the mean, 1/s_e, s, and for L∞ the k-th largest |d| (for the tie
    rule); in low precision also the mean in the input dtype, so that it recomputes exactly the forward's
    deviations. With ``create_graph=True`` the backward is :func:`backward_with_graph` (differentiable again).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, norm, k, low_precision):
        norm = Norm.parse(norm)
        n = x.numel() // x.shape[1]
        lowp = computes_in_input_dtype(x.dtype, low_precision)
        y, batch_mean, scale, inv_std, lowp_mean, threshold, top = training_forward(
            x, weight, bias, eps, norm, k, n, lowp
        )
        ctx.norm, ctx.k, ctx.eps = norm, k, eps
        ctx.channels_last = is_channels_last(x)
        ctx.bias_dtype = None if bias is None else bias.dtype
        top_values, top_positions = (None, None) if top is None else top
        ctx.save_for_backward(x, weight, batch_mean, scale, inv_std, lowp_mean, threshold, top_values, top_positions)
        ctx.mark_non_differentiable(batch_mean, scale)
        return y, batch_mean, scale

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_scale):
        x, weight, batch_mean, scale, inv_std, lowp_mean, threshold, top_values, top_positions = ctx.saved_tensors
        if torch.is_grad_enabled():
            return backward_with_graph(ctx, grad_y, x, weight) + (None,) * 4
        acc = inv_std.dtype
        n = x.numel() // x.shape[1]
        # grad_y in x's layout: the canonical view below needs it anyway (a copy only when they differ), and
        # torch's CPU reduction loses precision on mixed layouts in bf16 (errors of ~1e-3 relative measured).
        channels_last = ctx.channels_last
        if channels_last:
            grad_y = uncanonical(canonical(grad_y, True), x.shape, True)
        elif x.is_contiguous():
            grad_y = grad_y.contiguous()
        # One fused reduction pass: sum(dy * x_hat) and sum(dy), in at least float32.
        sum_dy_xhat, sum_dy = grad_sums(grad_y, x, batch_mean, inv_std)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gamma = torch.ones_like(inv_std) if weight is None else weight.to(acc)
            view = canonical(x, channels_last)
            dy = canonical(grad_y, channels_last)
            dev_mean = batch_mean if lowp_mean is None else lowp_mean
            factor = scale_factor(ctx.norm, n, ctx.k)
            if ctx.norm is Norm.L1:
                u = (view - dev_mean[:, None]).sign_()
                sum_u = channel_sums(u, acc)
                coef, offset = input_grad_coefficients(sum_dy, sum_dy_xhat, sum_u, gamma, scale, inv_std, n, factor)
                if u.dtype == acc == x.dtype:
                    grad_x = input_grad(dy, u, gamma, inv_std, coef, offset, out=u)
                else:
                    # Half inputs: dy * gamma / s_e + offset by torch's fused kernel straight into the input dtype,
                    # then the sign term (u is exact in any dtype): two roundings, no float32 copies of dy and u.
                    grad_x = _scale_shift(dy, gamma * inv_std, offset)
                    if vmapped(grad_x):  # vmap over the backward: in-place addcmul_ has no batching rule
                        grad_x = torch.addcmul(grad_x, u.to(x.dtype), coef.to(x.dtype)[:, None])
                    else:
                        grad_x.addcmul_(u.to(x.dtype), coef.to(x.dtype)[:, None])
            elif can_read_on_host(x):
                # Only the values at or above the k-th largest |d| carry the scale's gradient.
                top = None if top_values is None else (top_values, top_positions)
                index, u_selected, sum_u = _sum_u_sparse(view, dev_mean, threshold, ctx.k, acc, top)
                coef, offset = input_grad_coefficients(sum_dy, sum_dy_xhat, sum_u, gamma, scale, inv_std, n, factor)
                grad_x = _scale_shift(dy, gamma * inv_std, offset)
                grad_x.index_put_(index, (coef[index[1]] * u_selected).to(grad_x.dtype), accumulate=True)
            else:
                # Traced graphs (compile, export, meta and fake tensors) cannot have the sparse form's
                # data-dependent shapes.
                dev = view - dev_mean[:, None]
                u = dev.sign().to(acc) * linf_tie_weights(dev.abs(), threshold, ctx.k, (0, 2))
                sum_u = u.sum(dim=(0, 2))
                coef, offset = input_grad_coefficients(sum_dy, sum_dy_xhat, sum_u, gamma, scale, inv_std, n, factor)
                grad_x = input_grad(dy, u, gamma, inv_std, coef, offset)
            grad_x = uncanonical(grad_x, x.shape, channels_last).to(x.dtype)
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None


def differentiable_batch_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, norm: Norm, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm in differentiable torch ops: ``(y, batch_mean, batch_scale)``.

    The path for higher-order derivatives, ``torch.func`` transforms and forward-mode AD: autograd (and
    functorch) differentiate it as often as asked, and its first derivative is the closed form of
    :mod:`normdecouple.stats`. The L∞ scale is written as ``sum(|d| * w) / (k c(n, k))`` with the tie weights
    w of :func:`~normdecouple.stats.linf_tie_weights` taken as constants: its value is the top-k mean (the
    values above t count once, the ones tied at t share the remaining places) and its derivative is exactly
    the documented tie rule. The statistics run in :func:`accumulate_dtype` (also for ``low_precision``: its
    derivatives are float32's). The returned statistics are detached.
    """
    acc = accumulate_dtype(x.dtype)
    dims = [0] + list(range(2, x.dim()))
    n = x.numel() // x.shape[1]
    xa = x.to(acc)
    mean = xa.mean(dim=dims, keepdim=True)
    dev = xa - mean
    abs_dev = dev.abs()
    if norm is Norm.L1:
        scale = abs_dev.mean(dim=dims, keepdim=True) * scale_factor(Norm.L1, n, k)
    else:
        with torch.no_grad():
            # t, the k-th largest |d| per channel: topk on the (C, n) rows of the detached deviations.
            threshold = channel_major(abs_dev.detach()).topk(k, dim=1, sorted=False).values.amin(dim=1)
            w = linf_tie_weights(abs_dev.detach(), threshold, k, tuple(dims))
        scale = (abs_dev * w).sum(dim=dims, keepdim=True) / (k * topk_constant_of_input(x, k))
    y = dev * torch.rsqrt(scale * scale + eps)
    if weight is not None:
        y = y * per_channel(weight.to(acc), x)
    if bias is not None:
        y = y + per_channel(bias.to(acc), x)
    return y.to(x.dtype), mean.detach().view(-1), scale.detach().view(-1)


def backward_with_graph(ctx, grad_y: Tensor, x: Tensor, weight: Tensor | None) -> tuple[Tensor | None, ...]:
    """The first-order backward of a training-mode Function, itself differentiable (``create_graph=True``).

    Recomputes :func:`differentiable_batch_norm` from the saved input and differentiates it with the graph
    kept, so gradient penalties, ``gradgradcheck`` and Hessian-vector products are exact. Returns the
    gradients of (x, weight, bias). Used by the PyTorch and Triton Functions; ``ctx`` needs ``norm``, ``k``,
    ``eps``, ``bias_dtype`` and ``needs_input_grad``.
    """
    with torch.enable_grad():
        # An input that needs a gradient requires grad, and its saved copy keeps its history.
        wanted = [(slot, t) for slot, t in ((0, x), (1, weight)) if t is not None and ctx.needs_input_grad[slot]]
        grads: list[Tensor | None] = [None, None, None]
        if wanted:
            y, _, _ = differentiable_batch_norm(x, weight, None, ctx.eps, ctx.norm, ctx.k)
            inputs = [t for _, t in wanted]
            for (slot, _), g in zip(wanted, torch.autograd.grad(y, inputs, grad_y, create_graph=True)):
                grads[slot] = g
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dims = [0] + list(range(2, grad_y.dim()))
            grads[2] = grad_y.sum(dim=dims).to(ctx.bias_dtype)
    return tuple(grads)
