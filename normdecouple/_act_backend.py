r"""L1/L∞ batch norm fused with an activation that saves its output instead of its input.

The block ``conv -> BatchNorm -> ReLU`` keeps two activation-sized tensors for torch's backward: the
BatchNorm's input and the ReLU's output. The next convolution keeps the ReLU's output anyway. For L2 batch
norm the input is needed everywhere (its backward needs x_hat at every value), which is why InPlace-ABN has to
invert a leaky ReLU. L1 and L∞ need much less (notation of :mod:`normdecouple.stats`; z = BN(x) + r is the
activation's input, r the optional residual, dz = dL/dz):

.. math::

    dx = dz \cdot \gamma / s_e + \text{offset} + \text{coef} \cdot u, \qquad
    \text{coef}, \text{offset} \text{ from } \textstyle\sum dz,\ \sum dz\,\hat x,\ \sum u

* dz = dL/dy * act'(z), and act' is read from the saved output (``y > 0`` iff ``z > 0``, for ReLU and for a
  leaky ReLU with a positive slope);
* sum(dz x_hat) needs x_hat only where dz != 0, i.e. where the activation passes the gradient: there
  z is recovered from y (``z = y``, or ``y / slope`` for the leaky part) and
  ``sum(dz x_hat) = (sum(dz (z - r)) - beta sum(dz)) / gamma``;
* u is sign(d) for L1 (one bit per value, packed 8 per ``uint8``) and, for L∞, sign(d) at the k positions of
  the largest |d| per channel (saved as one ``(C, k)`` int32 tensor, ``(position + 1) * sign(d)``).

So the Function saves: the output y (the next layer's saved input: the same storage), the residual (the block's
input, saved by the block's first convolution: the same storage), the per-channel vectors, and the bits or the
top-k positions. Nothing activation-sized of the input.

**Channels that keep their input.** Recovery divides by gamma and subtracts beta and the residual, so it loses
about ``u_dtype * (|beta| + max|r|) / |gamma|`` of x_hat (u_dtype the unit roundoff of the input dtype). A channel
with ``|beta| + max|r| > G |gamma|`` (:func:`max_gain`: G = 4 in fp16/bf16, 1024 in float32/64; so every
gamma = 0 channel) keeps its input values instead, and its gradient is computed from them
exactly as the unfused layer does; so do L1 channels with a deviation of exactly 0 (sign 0 has no bit) and L∞
channels tied at the k-th place (the tie rule spreads over more than k values). Such channels are found in the
forward (one host sync) and cost their own size in memory; typical channels cost 1 bit per value.

Double backward needs the input: with ``keep_input=True`` the Function also saves it and ``create_graph=True``
differentiates :func:`~normdecouple._torch_backend.differentiable_batch_norm`; otherwise ``create_graph=True``
is a ``RuntimeError`` naming the fix. ``torch.func`` transforms, forward-mode AD and ``torch.compile`` take the
unfused path (correct, without the memory saving).

References: arXiv:1803.01814; Rota Bulò, Porzi, Kontschieder, In-Place Activated BatchNorm, arXiv:1712.02616.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import functional as F_nd
from ._torch_backend import differentiable_batch_norm, training_forward
from .stats import (
    Norm,
    accumulate_dtype,
    can_read_on_host,
    canonical,
    grad_sums,
    input_grad,
    input_grad_coefficients,
    is_channels_last,
    linf_tie_weights,
    scale_factor,
    uncanonical,
    vmapped,
)

__all__ = [
    "ACTIVATIONS",
    "HALF_MAX_GAIN",
    "FULL_MAX_GAIN",
    "max_gain",
    "LpBatchNormActFunction",
    "lp_batch_norm_act",
    "activate",
    "validate_activation",
    "pack_bits",
    "unpack_bits",
]

#: Accepted values of ``activation``.
ACTIVATIONS = ("relu", "leaky_relu", "identity")

#: fp16/bf16: a channel is recovered from the output only when (|beta| + max|r|) <= HALF_MAX_GAIN * |gamma|, so
#: that the recovered x_hat is within about 5 roundings of the output (measured gradient errors within 4x the
#: unfused layer's: tests/test_batchnorm_act.py and docs/memory.md); other channels keep their input.
HALF_MAX_GAIN = 4.0

#: float32/float64: the same rule with 1024: the recovered x_hat within about 1e-4 (float32) or 2e-13 (float64)
#: of the unfused layer's.
FULL_MAX_GAIN = 1024.0


def max_gain(dtype: torch.dtype) -> float:
    """The largest (|beta| + max|r|) / |gamma| of a channel whose x_hat is recovered from the output."""
    return HALF_MAX_GAIN if dtype in (torch.float16, torch.bfloat16) else FULL_MAX_GAIN


def validate_activation(activation: str, negative_slope: float) -> tuple[str, float]:
    """Check ``activation`` and ``negative_slope``; returns them.

    Raises:
        ValueError: for an unknown activation, or a leaky ReLU whose slope is not a positive finite number
            (the recovery divides by it where the output is negative; ``"relu"`` is the slope-0 case).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope must be a float, got {negative_slope!r}")
    slope = float(negative_slope)
    if activation == "leaky_relu" and not (0.0 < slope < float("inf")):
        raise ValueError(
            f"negative_slope must be positive and finite for activation='leaky_relu' (the input is recovered "
            f"from the output by dividing by it), got {negative_slope!r}; use activation='relu' for a slope of 0"
        )
    return activation, slope


def activate(z: Tensor, activation: str, negative_slope: float, inplace: bool = False) -> Tensor:
    """The activation itself, as torch computes it (``F.relu`` / ``F.leaky_relu``)."""
    if activation == "relu":
        return torch.nn.functional.relu(z, inplace=inplace)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope, inplace=inplace)
    return z


def pack_bits(bits: Tensor) -> Tensor:
    """A bool tensor as ``uint8`` bytes, 8 values per byte in memory order (``ceil(numel / 8)`` bytes).

    On the CPU numpy's SIMD ``packbits`` (little bit order; torch's int64 shifts are not vectorised there),
    elsewhere :func:`_pack_bits_torch`, which gives the same bytes.
    """
    flat = bits.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_bits_torch(flat)


def _pack_bits_torch(flat: Tensor) -> Tensor:
    """Eight bools (bytes 0/1) read as one little-endian int64 with value i at bit 8i; three shift-or steps
    gather bit 8i at bit i of the lowest byte (7 = 8 - 1, 14 = 16 - 2, 28 = 32 - 4): a few passes over
    numel / 8 words instead of a reduction over groups of 8."""
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    words = flat.view(torch.uint8).view(torch.int64)
    words = words | (words >> 7)
    words = words | (words >> 14)
    words = words | (words >> 28)
    return (words & 0xFF).to(torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`pack_bits`: a ``uint8`` tensor of 0/1 values of ``shape``."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=shape.numel(), bitorder="little")).view(shape)
    return _unpack_bits_torch(packed, shape)


def _unpack_bits_torch(packed: Tensor, shape: torch.Size) -> Tensor:
    """Bit i of a byte to bit 8i of an int64 (i = 4a + 2b + c moves by 28a + 14b + 7c = 8i - i), then the
    mask keeps bit 0 of every byte."""
    words = packed.to(torch.int64)
    words = words | (words << 28)
    words = words | (words << 14)
    words = words | (words << 7)
    words = words & 0x0101010101010101
    return words.view(torch.uint8)[: shape.numel()].view(shape)


def _per_channel_absmax(r: Tensor) -> Tensor:
    dims = [0] + list(range(2, r.dim()))
    return torch.maximum(r.amax(dim=dims).abs(), r.amin(dim=dims).abs())


def _sign_bits(view: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Packed bits of ``view > mean`` and, per channel, whether a value equals its mean.

    These are sign(x - mu) as the unfused backward computes it: x - mu rounds to 0 only where x == mu, and the
    comparisons promote as the subtraction does. On the CPU numpy's SIMD comparisons (about 4x faster than
    torch's comparisons to a bool tensor); bf16 (which numpy lacks) and other devices use torch.
    """
    if view.device.type == "cpu" and torch.bfloat16 not in (view.dtype, mean.dtype):
        values, centre = view.detach().numpy(), mean.detach().numpy()
        bits = torch.from_numpy(np.packbits(values > centre, bitorder="little"))
        return bits, torch.from_numpy((values == centre).any(axis=(0, 2)))
    return pack_bits(view > mean), (view == mean).any(dim=(0, 2))


class LpBatchNormActFunction(torch.autograd.Function):
    """Training-mode ``act(BN(x) + residual)`` for L1/L∞ that saves the output, not the input.

    ``apply(x, weight, bias, residual, eps, norm, k, low_precision, activation, negative_slope, keep_input,
    use_triton=False)`` returns ``(y, batch_mean, batch_scale)`` like
    :class:`~normdecouple._torch_backend.LpBatchNormFunction` (the statistics without gradient; running
    statistics are the caller's). ``use_triton``: the Triton forward and L1 input gradient, same saved tensors.
    The output equals the unfused ``act(BN(x) + residual)`` of the same backend bit for bit; what is saved is
    described in the module docstring. ``keep_input=True`` also saves ``x`` so that ``create_graph=True`` works.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, norm, k, low_precision, activation, negative_slope,
                keep_input, use_triton=False):
        n = x.numel() // x.shape[1]
        lowp = low_precision and x.dtype in (torch.float16, torch.bfloat16)
        signs = has_zero = sign_sum = None
        if use_triton:
            from ._triton import act_launch

            y, batch_mean, scale, inv_std, threshold, top, signs, has_zero, sign_sum = act_launch.statistics(
                x, weight, bias, residual, eps, norm, k, activation, negative_slope)
            lowp_mean = None
        else:
            # The unfused layer's own forward (same values); for L∞ ``top`` holds the sorted largest |d| of
            # each channel (k and a few more) and their positions in the channel-major row.
            y, batch_mean, scale, inv_std, lowp_mean, threshold, top = training_forward(
                x, weight, bias, eps, norm, k, n, lowp
            )
            if residual is not None:
                y = y.add_(residual)
            y = activate(y, activation, negative_slope, inplace=True)

        acc = accumulate_dtype(x.dtype)
        channels_last = is_channels_last(x)
        view = canonical(x, channels_last)
        dev_mean = (batch_mean if lowp_mean is None else lowp_mean)[:, None]
        gamma = torch.ones_like(inv_std) if weight is None else weight.detach().to(acc)
        spread = torch.zeros_like(inv_std) if bias is None else bias.detach().to(acc).abs()
        if residual is not None:
            spread = spread + _per_channel_absmax(residual.detach()).to(acc)
        # Recovery loses about u * (|beta| + max|r|) / |gamma| of x_hat (u the unit roundoff), and subnormal
        # outputs about u * tiny / |gamma|: keep the inputs of channels where that exceeds u * max_gain.
        poor = gamma.abs() * max_gain(x.dtype) <= spread + 2 * torch.finfo(x.dtype).tiny
        if norm is Norm.L1:
            # A value at the mean has sign 0, which one bit cannot hold: that channel keeps its input.
            if signs is None:
                signs, has_zero = _sign_bits(view, dev_mean)
            poor |= has_zero.to(poor.device)
        else:
            values, indices = top
            threshold = threshold.clone()  # a view of the candidates: keep (C,) values, not the candidates
            if k < values.shape[1]:
                kth = values[:, k - 1]
                # A value tied with the k-th largest |d| shares the scale's gradient (the tie rule): not k.
                poor |= (values[:, k] == kth) & (kth > 0)
            positions = indices[:, :k]
            inner = view.shape[2]
            channel = torch.arange(view.shape[1], device=x.device)[:, None]
            # sign(d) as the unfused backward computes it (same operation, same dtypes), at the k positions;
            # saved as one integer per entry: (position + 1) * sign(d), 0 where d = 0 (no contribution to u).
            picked = view[positions // inner, channel, positions % inner] - dev_mean
            marks = (positions + 1) * torch.sign(picked).long()
            signs = marks.to(torch.int32) if n < 2**31 - 1 else marks
        fallback = poor.nonzero().squeeze(1)
        kept = view.index_select(1, fallback)

        ctx.norm, ctx.k, ctx.eps, ctx.n = norm, k, eps, n
        ctx.activation, ctx.negative_slope = activation, negative_slope
        ctx.channels_last = channels_last
        ctx.shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.keep_input = keep_input
        ctx.use_triton = use_triton
        ctx.save_for_backward(
            y, residual, weight, bias, batch_mean, scale, inv_std, lowp_mean, threshold, signs, fallback,
            kept, x if keep_input else None, sign_sum,
        )
        ctx.mark_non_differentiable(batch_mean, scale)
        return y, batch_mean, scale

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_scale):
        (y, residual, weight, bias, batch_mean, scale, inv_std, lowp_mean, threshold, signs, fallback, kept,
         x, sign_sum) = ctx.saved_tensors
        if torch.is_grad_enabled():
            if not ctx.keep_input:
                raise RuntimeError(
                    "the fused BatchNorm + activation layer does not keep its input, which a differentiable "
                    "backward (create_graph=True, double backward) needs; build the layer with "
                    "double_backward=True (keeps the input, no memory saving) or use the unfused layer "
                    "(L1BatchNorm2d/LinfBatchNorm2d followed by the activation); for a model fused by "
                    "convert_batchnorm(..., fuse_activation=True), call normdecouple.fuse.unfuse_activations(model) "
                    "before differentiating twice"
                )
            return _backward_with_graph(ctx, grad_y, x, weight, bias, residual)
        return _backward(ctx, grad_y, y, residual, weight, bias, batch_mean, scale, inv_std, lowp_mean,
                         threshold, signs, fallback, kept, sign_sum)


def _backward(ctx, grad_y, y, residual, weight, bias, batch_mean, scale, inv_std, lowp_mean, threshold, signs,
              fallback, kept, sign_sum):
    acc = inv_std.dtype
    shape, channels_last = ctx.shape, ctx.channels_last
    # grad_y in the input's layout, as the unfused backward does (bf16 reductions on mixed layouts lose bits).
    grad_y = canonical(grad_y, channels_last)
    out = canonical(y, channels_last)
    gamma = torch.ones_like(inv_std) if weight is None else weight.to(acc)
    beta = torch.zeros_like(inv_std) if bias is None else bias.to(acc)
    one = torch.ones_like(inv_std)
    # sum(dz x_hat) = (sum(dz (z - r)) - beta sum(dz)) / gamma, each sum by torch's fused batch-norm backward
    # reduction (sum(g (v - m) s) and sum(g) in one pass). ReLU: dz = 0 where y = 0, z = y elsewhere. Leaky
    # ReLU: dz z = (dy slope) (y / slope) = dy y where y < 0, so sum(dz z) = sum(dy y).
    if ctx.activation == "relu":
        dz = torch.ops.aten.threshold_backward(grad_y, out, 0)
        _, sum_dz_zb, sum_dz = _channel_sums(dz, out, beta, one)
    elif ctx.activation == "leaky_relu":
        dz = torch.ops.aten.leaky_relu_backward(grad_y, out, ctx.negative_slope, True)
        _, sum_dy_y, _ = _channel_sums(grad_y, out, torch.zeros_like(beta), one)
        sum_dz = dz.sum(dim=(0, 2), dtype=acc)
        sum_dz_zb = sum_dy_y - beta * sum_dz
    else:
        dz = grad_y
        _, sum_dz_zb, sum_dz = _channel_sums(dz, out, beta, one)
    if residual is not None:
        _, sum_dz_r, _ = _channel_sums(dz, canonical(residual, channels_last), torch.zeros_like(beta), one)
        sum_dz_zb = sum_dz_zb - sum_dz_r
    sum_dz_xhat = sum_dz_zb / gamma

    n, k = ctx.n, ctx.k
    if ctx.norm is Norm.L1 and sign_sum is not None:
        # Triton: the forward's sum of sign(d) (equal to 2 sum(b) - n wherever no value sits at the mean, and the
        # others keep their input); the input-gradient kernel reads the bits themselves.
        u = None
        sum_u = sign_sum.to(acc)
    elif ctx.norm is Norm.L1:
        # u = 2 b - 1 from the bits b (1 where d > 0), used as b: dx = ... + coef (2 b - 1). (b in acc first:
        # torch's reductions and addcmul on uint8 convert per element, about twice as slow.)
        u = unpack_bits(signs, out.shape).to(acc)
        sum_u = u.sum(dim=(0, 2)) * 2 - n
    else:
        u = None
        # signs holds (position + 1) * sign(d) of the k largest |d| per channel (see the forward).
        positions = (signs.abs().long() - 1).clamp_(min=0)
        signs = signs.sign()
        sum_u = signs.sum(dim=1, dtype=acc)

    any_fallback = fallback.numel() > 0
    if any_fallback:
        # Channels that kept their input: x_hat and u from it, exactly as the unfused backward.
        dz_f = dz.index_select(1, fallback)
        xhat_f = (kept.to(acc) - batch_mean[fallback][:, None]) * inv_std[fallback][:, None]
        sum_dz_xhat = sum_dz_xhat.index_copy(0, fallback, (dz_f.to(acc) * xhat_f).sum(dim=(0, 2)))
        del xhat_f
        dev_mean = batch_mean if lowp_mean is None else lowp_mean
        dev_f = kept - dev_mean[fallback][:, None]
        u_f = dev_f.sign().to(acc)
        if ctx.norm is Norm.LINF:
            u_f = u_f * linf_tie_weights(dev_f.abs(), threshold[fallback], k, (0, 2))
        del dev_f
        sum_u = sum_u.index_copy(0, fallback, u_f.sum(dim=(0, 2)))

    factor = scale_factor(ctx.norm, n, k)
    coef, offset = input_grad_coefficients(sum_dz, sum_dz_xhat, sum_u, gamma, scale, inv_std, n, factor)
    grad_x = None
    if ctx.needs_input_grad[0]:
        if ctx.norm is Norm.L1:
            # dz * gamma / s_e + (offset - coef) + 2 coef b: the multiplication first, so no broadcast copy.
            if ctx.use_triton and not vmapped(dz):  # a kernel cannot read vmap's batched tensors
                from ._triton import act_launch

                grad_x = act_launch.l1_input_grad(dz, signs, gamma * inv_std, offset - coef, coef * 2)
            else:
                if u is None:  # the Triton forward's bits, read here as torch ops (vmap over the backward)
                    u = unpack_bits(signs, out.shape).to(acc)
                grad_x = dz * (gamma * inv_std)[:, None]
                grad_x = grad_x.add_((offset - coef)[:, None]).addcmul_(u, (coef * 2)[:, None])
        else:
            grad_x = torch.addcmul(offset[:, None], dz, (gamma * inv_std)[:, None])
            inner = grad_x.shape[2]
            channel = torch.arange(grad_x.shape[1], device=grad_x.device)[:, None].expand_as(positions)
            grad_x.index_put_((positions // inner, channel, positions % inner), coef[:, None] * signs.to(acc),
                              accumulate=True)
        if any_fallback:
            part = input_grad(dz_f, u_f, gamma[fallback], inv_std[fallback], coef[fallback], offset[fallback])
            grad_x.index_copy_(1, fallback, part)
        grad_x = uncanonical(grad_x, shape, channels_last).to(ctx.x_dtype)
    grad_w = sum_dz_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    grad_b = sum_dz.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    grad_r = None
    if ctx.residual_dtype is not None and ctx.needs_input_grad[3]:
        grad_r = uncanonical(dz.contiguous(), shape, channels_last).to(ctx.residual_dtype)
    return grad_x, grad_w, grad_b, grad_r, None, None, None, None, None, None, None, None


def _channel_sums(grad: Tensor, values: Tensor, shift: Tensor, mult: Tensor) -> tuple:
    """(None, sum(grad * (values - shift) * mult), sum(grad)) per channel of (A, C, B) views, in one pass."""
    return (None, *grad_sums(grad, values, shift, mult))


def _backward_with_graph(ctx, grad_y, x, weight, bias, residual):
    """``create_graph=True``: recompute ``act(BN(x) + r)`` differentiably from the kept input."""
    with torch.enable_grad():
        y, _, _ = differentiable_batch_norm(x, weight, bias, ctx.eps, ctx.norm, ctx.k)
        if residual is not None:
            y = y + residual
        y = activate(y, ctx.activation, ctx.negative_slope)
        slots = [(i, t) for i, t in enumerate((x, weight, bias, residual))
                 if t is not None and ctx.needs_input_grad[i]]
        grads: list[Tensor | None] = [None] * 4
        if slots:
            found = torch.autograd.grad(y, [t for _, t in slots], grad_y, create_graph=True, allow_unused=True)
            for (i, t), g in zip(slots, found):
                grads[i] = torch.zeros_like(t) if g is None else g
    return tuple(grads) + (None,) * 8


def _check_residual(input: Tensor, residual: Tensor | None) -> None:
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ValueError(
            f"residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}; "
            "the fused layer computes act(BN(input) + residual) without broadcasting"
        )
    if residual.dtype != input.dtype or residual.device != input.device:
        raise TypeError(
            f"residual must have the input's dtype and device ({input.dtype}, {input.device}), got "
            f"({residual.dtype}, {residual.device}); convert it with residual.to(input)"
        )


def _unfusable(input: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None) -> bool:
    """Whether the memory-saving Function cannot serve this call (it then runs unfused, with the same values)."""
    if not can_read_on_host(input):
        # Compiled, exported, meta and fake tensors, torch.func: the fused forward reads the channels that keep
        # their inputs on the host (a data-dependent shape).
        return True
    if F_nd.needs_differentiable_path(input, weight):
        return True
    if F_nd.needs_differentiable_path(residual if residual is not None else input, bias):
        return True
    return False


def _triton_supports(input: Tensor, low_precision: bool) -> bool:
    from ._triton import act_launch

    return act_launch.supports(input, low_precision)


def lp_batch_norm_act(
    input: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    norm: Norm,
    k: int,
    low_precision: bool,
    backend: str,
    activation: str,
    negative_slope: float,
    keep_input: bool = False,
) -> Tensor:
    """``act(batch_norm(input) + residual)`` with the arguments of the functional batch norms.

    Training with a non-empty batch runs :class:`LpBatchNormActFunction`, on the Triton kernels
    (:mod:`normdecouple._triton.act_launch`) where the unfused layer would use Triton and the layout and
    precision allow, else in torch ops. Everything else
    (eval, empty batches, ``torch.func``, forward-mode AD, ``torch.compile``) runs the unfused batch norm of
    :mod:`normdecouple.functional` followed by the activation: the same values and gradients.
    """
    _check_residual(input, residual)
    fused = training and input.dim() >= 2 and input.numel() > 0 and not _unfusable(input, weight, bias, residual)
    if not fused:
        y = F_nd.lp_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, norm, k,
                                low_precision, backend)
        if residual is not None:
            y = y + residual
        return activate(y, activation, negative_slope)
    # The checks of the unfused path, in its order and words.
    F_nd.check_arguments(input, running_mean, running_var, weight, bias, training, eps, backend)
    count = F_nd.training_count(input, norm, k)
    # Triton where the unfused layer would use it (and its errors where it cannot run), for the layouts and
    # precision the epilogue kernels take; the PyTorch path otherwise.
    use_triton = (F_nd.select_function(input, backend) is not F_nd.LpBatchNormFunction
                  and _triton_supports(input, low_precision))
    y, batch_mean, batch_scale = LpBatchNormActFunction.apply(
        input, weight, bias, residual, eps, norm, k, low_precision, activation, negative_slope, keep_input,
        use_triton,
    )
    if running_mean is not None:
        F_nd.update_running_stats(running_mean, running_var, batch_mean, batch_scale, count, momentum)
    return y
