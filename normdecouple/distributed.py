r"""L1 and L∞ batch normalization synchronised across the processes of a ``torch.distributed`` group.

torch's :class:`torch.nn.SyncBatchNorm` cannot serve these layers: it computes L2 statistics, runs on CUDA
only, and its converter turns every ``_BatchNorm`` subclass, ours included, into an L2 layer. This module
provides the synchronised counterparts of normdecouple's layers, :class:`SyncL1BatchNorm` and
:class:`SyncLinfBatchNorm` (any input rank >= 2, like torch's);
:func:`normdecouple.convert_sync_batchnorm` / :func:`normdecouple.revert_sync_batchnorm` (in
:mod:`normdecouple.convert`) swap them into and out of a model. They work with every backend that
implements the collectives used (gloo on CPU, NCCL on CUDA). A BatchNorm subclass converted by
:func:`normdecouple.convert_batchnorm` (timm's ``BatchNormAct2d``: ``act(drop(F.batch_norm(...)))``) gets a
synchronised form derived from the user's class and one of these two: its own ``forward`` runs, and the
``torch.nn.functional.batch_norm`` call inside it is this module's synchronised computation. (timm's own
``timm.layers.convert_sync_batchnorm`` would turn it, and every layer of ours, into L2 batch norm.)

Exactness: the statistics, the running statistics and the input gradients are those of one process holding
the concatenation of every rank's batch, up to the order of summation; ranks may hold different batch sizes,
an empty one included.

Notation (one channel): rank r holds n_r values, N = sum_r n_r, mu the global mean, d = x - mu, s the scale,
s_e = sqrt(s^2 + eps), x_hat = d / s_e, g = dL/dy * weight.

Collectives per layer call (training, world size > 1), all on small per-channel vectors in float64:

* L1 forward, 2 ``all_reduce`` (sum):   [sum x (C), n_r (1)], then [sum |d| (C)]. Two is the minimum: sum |x - mu|
  cannot be assembled from per-rank summaries without knowing mu first.
* L∞ forward, 1 all-gather of W x (C + 1 + 2kC) values (W processes): each rank's [sum x, n_r] and, per
  channel, its k largest and k smallest x (all of its values when n_r < 2k). The k largest |x - mu| of the
  whole batch are among the k largest and k smallest x of each rank, so every rank finds the global top-k of
  |d| (and hence s and the k-th largest |d|, t) without a second round. (An exact global top-k needs all
  W k C candidates in some form; gathering them with the sums saves the round trip of a second collective.)
* backward, 1 ``all_reduce`` (sum) when the input needs a gradient: L1 [sum dy, sum dy x_hat, sum sign d]
  (3C); L∞ [sum dy, sum dy x_hat, #(|d| = t), sum over |d| = t of sign d] (4C), plus
  [#(|d| > t), sum over |d| > t of sign d] for k > 1 (6C).

torch's L2 ``SyncBatchNorm`` uses 1 + 1.

The global count N is read on the host after the first collective (c(N, k) and the variance correction
N / (N - 1) are host constants), and the L∞ backward selects the few values with |d| >= t with ``nonzero``
as the torch backend does; on CUDA these are device synchronisations, like the one in torch's
``SyncBatchNorm``. The rank-local arithmetic is the PyTorch backend's.

References: arXiv:1803.01814
"""

from __future__ import annotations

import string
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import batchnorm as bn
from ._constants import L1_SCALE
from ._torch_backend import normalise
from .stats import (
    Norm,
    accumulate_dtype,
    can_read_on_host,
    canonical,
    computes_in_input_dtype,
    channel_major,
    input_grad,
    input_grad_coefficients,
    is_channels_last,
    linf_selected,
    pairwise_mean,
    scale_factor,
    traceable_topk_constant,
    uncanonical,
    vmapped,
)
from .functional import l1_batch_norm, linf_batch_norm, update_running_stats

__all__ = [
    "SyncL1BatchNorm",
    "SyncLinfBatchNorm",
]

# Per-channel vectors cross the wire in float64: counts stay exact beyond 2**24 values per channel, and
# fp16/bf16/fp32 values (the L∞ candidates) round-trip exactly.
_WIRE = torch.float64


def _all_gather(local: Tensor, group: Any, world_size: int) -> Tensor:
    """(world_size, n): every rank's 1-D ``local`` of n values, in rank order."""
    gather_single = getattr(dist, "all_gather_single", None)
    if gather_single is not None:
        # The concatenated (flat) output form: gloo accepts only that one.
        out = local.new_empty(world_size * local.shape[0])
        gather_single(out, local, group)
        return out.view(world_size, -1)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local, group)
    return torch.stack(parts)


def _check_global_count(count: int, norm: Norm, k: int, x: Tensor, world_size: int) -> None:
    # Every rank holds the same count after the first collective, so every rank raises here together and
    # none is left waiting in a later collective. No value anywhere (every rank empty) is torch's empty batch:
    # an empty output and untouched running statistics, with every collective still made.
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {count} value(s) per channel over the "
            f"{world_size} processes of the group (local input size {tuple(x.shape)}); use a larger batch"
        )
    if norm is Norm.LINF and 0 < count < k:
        raise ValueError(
            f"linf_batch_norm: k={k} exceeds the n={count} values per channel of the global batch over "
            f"{world_size} processes (local input size {tuple(x.shape)}); use k <= {count} or a larger batch"
        )


def _local_mean_sum(x: Tensor, lowp: bool) -> Tensor:
    """n_r * (local mean) per channel in float64: zeros for an empty batch."""
    channels = x.shape[1]
    n_local = x.numel() // max(channels, 1)
    if n_local == 0:
        return torch.zeros(channels, dtype=_WIRE, device=x.device)
    if lowp:
        # The local blocked mean stays in the input dtype; only the weighting by counts is float64.
        return pairwise_mean(channel_major(x)).to(_WIRE) * n_local
    view = canonical(x, is_channels_last(x))
    return view.sum(dim=(0, 2), dtype=accumulate_dtype(x.dtype)).to(_WIRE)


def _local_extremes(x: Tensor, k: int) -> Tensor:
    """(C, 2k) per channel: the k largest and k smallest x, or all n_r < 2k values zero-padded."""
    channels = x.shape[1]
    n_local = x.numel() // max(channels, 1)
    if n_local == 0:
        return x.new_zeros(channels, 2 * k)
    if n_local < 2 * k:
        # Below 2k values the two lists would share elements; all values (a sub-multiset, as required) instead.
        return torch.nn.functional.pad(channel_major(x), (0, 2 * k - n_local))
    if k == 1:
        view = canonical(x, is_channels_last(x))
        return torch.stack([view.amax(dim=(0, 2)), view.amin(dim=(0, 2))], dim=1)
    per_channel = channel_major(x)
    top = per_channel.topk(k, dim=1, sorted=False).values
    bottom = per_channel.topk(k, dim=1, largest=False, sorted=False).values
    return torch.cat([top, bottom], dim=1)


def _forward_l1(x: Tensor, lowp: bool, group: Any, world_size: int) -> tuple[Tensor, Tensor, int]:
    """Global mean and L1 scale s (in the input dtype when ``lowp``, else the accumulation dtype), and N."""
    channels = x.shape[1]
    n_local = x.numel() // channels
    stat_dtype = x.dtype if lowp else accumulate_dtype(x.dtype)
    packed = torch.cat([_local_mean_sum(x, lowp), torch.full((1,), n_local, dtype=_WIRE, device=x.device)])
    dist.all_reduce(packed, group=group)
    count = int(packed[channels].item())
    _check_global_count(count, Norm.L1, 1, x, world_size)
    mean = (packed[:channels] / max(count, 1)).to(stat_dtype)
    if n_local == 0:
        abs_sum = torch.zeros(channels, dtype=_WIRE, device=x.device)
    elif lowp:
        abs_dev = (channel_major(x) - mean[:, None]).abs()
        abs_sum = pairwise_mean(abs_dev).to(_WIRE) * n_local
    else:
        view = canonical(x, is_channels_last(x))
        abs_sum = (view - mean[:, None]).abs_().sum(dim=(0, 2)).to(_WIRE)
    dist.all_reduce(abs_sum, group=group)
    if lowp:
        scale = (abs_sum / max(count, 1)).to(stat_dtype) * L1_SCALE
    else:
        scale = (abs_sum * (L1_SCALE / max(count, 1))).to(stat_dtype)
    return mean, scale, count


def _forward_linf(x: Tensor, k: int, lowp: bool, group: Any, world_size: int
                  ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Global mean, s, t (the k-th largest |d|) and N from one all-gather."""
    channels = x.shape[1]
    n_local = x.numel() // channels
    stat_dtype = x.dtype if lowp else accumulate_dtype(x.dtype)
    local = torch.cat([
        _local_mean_sum(x, lowp),
        torch.full((1,), n_local, dtype=_WIRE, device=x.device),
        _local_extremes(x, k).to(_WIRE).flatten(),
    ])
    gathered = _all_gather(local, group, world_size)
    counts = gathered[:, channels]
    count = int(counts.sum().item())
    _check_global_count(count, Norm.LINF, k, x, world_size)
    if count == 0:
        zeros = torch.zeros(channels, dtype=stat_dtype, device=x.device)
        return zeros, zeros, zeros.to(x.dtype), count
    mean = (gathered[:, :channels].sum(dim=0) / count).to(stat_dtype)
    # |candidate - mu| with exactly the arithmetic the backward applies to the local values (same dtypes),
    # so the k-th largest value t found here compares equal to the tied elements there.
    candidates = gathered[:, channels + 1:].view(world_size, channels, 2 * k).to(x.dtype)
    abs_dev = (candidates - mean[None, :, None]).abs()
    valid = torch.arange(2 * k, device=x.device)[None, :] < counts.clamp(max=2 * k)[:, None]
    abs_dev = torch.where(valid[:, None, :], abs_dev, torch.full_like(abs_dev, -1.0))
    pooled = abs_dev.transpose(0, 1).reshape(channels, world_size * 2 * k)
    top = pooled.topk(k, dim=1, sorted=False).values
    threshold = top.amin(dim=1)
    mean_top = pairwise_mean(top) if lowp else top.mean(dim=1)
    scale = (mean_top * (1.0 / traceable_topk_constant(count, k))).to(stat_dtype)
    return mean, scale, threshold, count


class SyncLpBatchNormFunction(torch.autograd.Function):
    """Training-mode L1/L∞ batch norm whose statistics and input gradient span a process group.

    ``apply(x, weight, bias, eps, norm, k, low_precision, group, world_size)`` returns
    ``(y, batch_mean, batch_scale, count)``: the global statistics in :func:`accumulate_dtype` (no gradient)
    and the global number of values per channel, an ``int``. The collectives are listed in the module
    docstring. The gradients of ``weight`` and ``bias`` are this rank's partial sums, as in torch's
    ``SyncBatchNorm``: ``DistributedDataParallel`` (or any all-reduce of the gradients) adds them up with every
    other parameter's; reducing them here as well would count them ``world_size`` times.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, norm, k, low_precision, group, world_size):
        norm = Norm.parse(norm)
        lowp = computes_in_input_dtype(x.dtype, low_precision)
        acc = accumulate_dtype(x.dtype)
        threshold = None
        if norm is Norm.L1:
            mean, scale, count = _forward_l1(x, lowp, group, world_size)
        else:
            mean, scale, threshold, count = _forward_linf(x, k, lowp, group, world_size)
        y, inv_std = normalise(x, weight, bias, mean, scale, eps, lowp)
        lowp_mean = mean if lowp else None
        ctx.norm, ctx.k, ctx.count, ctx.group = norm, k, count, group
        ctx.channels_last = is_channels_last(x)
        ctx.bias_dtype = None if bias is None else bias.dtype
        batch_mean, batch_scale = mean.to(acc), scale.to(acc)
        ctx.save_for_backward(x, weight, batch_mean, batch_scale, inv_std, lowp_mean, threshold)
        ctx.mark_non_differentiable(batch_mean, batch_scale)
        return y, batch_mean, batch_scale, count

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_scale, grad_count):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "normdecouple's synchronised batch norm does not support higher-order gradients "
                "(backward with create_graph=True, e.g. a gradient penalty): its backward sums over the "
                "process group. Train that model with the unsynchronised layers (revert_sync_batchnorm) or "
                "compute the penalty on a model copy in eval mode"
            )
        if vmapped(grad_y):
            raise RuntimeError(
                "normdecouple's synchronised batch norm does not support batched gradients (vmap over the "
                "backward: torch.func.vmap, autograd.grad(..., is_grads_batched=True), per-sample gradients): "
                "its backward all-reduces over the process group. Use the unsynchronised layers "
                "(revert_sync_batchnorm) for that computation"
            )
        x, weight, mean, scale, inv_std, lowp_mean, threshold = ctx.saved_tensors
        acc = inv_std.dtype
        channels = x.shape[1]
        empty = x.numel() == 0
        if empty:
            sum_dy_xhat = torch.zeros(channels, dtype=acc, device=x.device)
            sum_dy = torch.zeros_like(sum_dy_xhat)
        else:
            # Local sum(dy * x_hat) and sum(dy) in one fused pass, at least float32.
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, None, None, None, mean, inv_std, True, 0.0, [False, True, True]
            )
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(ctx, x, grad_y, weight, mean, scale, inv_std, lowp_mean, threshold, sum_dy,
                                 sum_dy_xhat)
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _input_grad(ctx, x, grad_y, weight, mean, scale, inv_std, lowp_mean, threshold, sum_dy, sum_dy_xhat
                ) -> Tensor:
    """dx_i = (g_i - mean(g) - (s / s_e) (sum_j g_j x_hat_j) (a_i - mean(a))) / s_e, means over the group.

    The one backward collective sums, per channel, sum(dy) and sum(dy x_hat) with the terms of mean(a):
    for L1 (a_i = sqrt(pi/2) sign(d_i) / N) the sum of sign(d); for L∞ (a_i = sign(d_i) w_i / (k c(N, k)))
    the number and sign sum of the values tied at t and, for k > 1, of those above t, from which every rank
    forms the torch backend's tie rule with global counts: w_i = 1 above t, (k - #above) / #tied at t, 0 below.
    """
    acc = inv_std.dtype
    count, k, channels = ctx.count, ctx.k, x.shape[1]
    empty = x.numel() == 0
    zeros = torch.zeros(channels, dtype=acc, device=x.device)
    local = [sum_dy, sum_dy_xhat]
    if not empty:
        view = canonical(x, ctx.channels_last)
        dev_mean = mean if lowp_mean is None else lowp_mean
    if ctx.norm is Norm.L1:
        sign = None if empty else (view - dev_mean[:, None]).sign_()
        local.append(zeros if empty else sign.sum(dim=(0, 2), dtype=acc))
    else:
        parts = [zeros] * (4 if k > 1 else 2)
        if not empty:
            index, sign_selected, above = linf_selected(view, dev_mean, threshold, acc)
            channel = index[1]

            def per_channel_sum(values: Tensor) -> Tensor:
                return torch.zeros_like(zeros).index_add_(0, channel, values.to(acc))

            tied_sign = torch.where(above, 0.0, sign_selected)
            parts = [per_channel_sum(~above), per_channel_sum(tied_sign)]
            if k > 1:  # nothing lies above the maximum
                parts += [per_channel_sum(above), per_channel_sum(sign_selected - tied_sign)]
        local += parts
    packed = torch.cat([v.to(_WIRE) for v in local])
    dist.all_reduce(packed, group=ctx.group)
    if empty:
        return torch.zeros_like(x)
    totals = packed.view(-1, channels).to(acc)
    gamma = torch.ones_like(inv_std) if weight is None else weight.to(acc)
    if ctx.norm is Norm.L1:
        sum_u = totals[2]
    else:
        n_tied, tied_sign_sum = totals[2], totals[3]
        n_above, above_sign_sum = (totals[4], totals[5]) if k > 1 else (zeros, zeros)
        # No tied value anywhere means t = 0 and no scale gradient: any finite share will do.
        share = (k - n_above) / n_tied.clamp(min=1)
        sum_u = share * tied_sign_sum + above_sign_sum
    coef, offset = input_grad_coefficients(totals[0], totals[1], sum_u, gamma, scale, inv_std, count,
                                           scale_factor(ctx.norm, count, k))
    dy = canonical(grad_y, ctx.channels_last)
    if ctx.norm is Norm.L1:
        grad_x = input_grad(dy, sign.to(acc), gamma, inv_std, coef, offset)
    else:
        grad_x = torch.addcmul(offset[:, None], dy, (gamma * inv_std)[:, None])
        u_selected = sign_selected * torch.where(above, 1.0, share[channel])
        grad_x.index_put_(index, coef[channel] * u_selected, accumulate=True)
    return uncanonical(grad_x, x.shape, ctx.channels_last).to(x.dtype)


_NO_GROUP_HELP = (
    "Initialise one first in every process, e.g. torch.distributed.init_process_group(backend='gloo') on CPU "
    "or backend='nccl' on CUDA (with the MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE environment variables that "
    "torchrun sets, or init_method=...), or train one process with the unsynchronised layers "
    "(normdecouple.revert_sync_batchnorm(model)); in eval mode no process group is needed."
)


class _SyncLpBatchNorm(bn.LpBatchNorm):
    """Synchronised training forward shared by :class:`SyncL1BatchNorm` and :class:`SyncLinfBatchNorm`.

    Two entries, one arithmetic: :meth:`_forward_impl` (the layers' own forward) and
    :meth:`_functional_batch_norm`, what a ``torch.nn.functional.batch_norm`` call inside the ``forward`` of a
    converted BatchNorm subclass (timm's ``BatchNormAct2d``) computes once
    :func:`normdecouple.convert_sync_batchnorm` has made that layer synchronised.
    """

    _dim = 0  # any rank >= 2, like torch.nn.SyncBatchNorm
    _unsync_default: type[bn.LpBatchNorm]

    def _init_sync(self, process_group: Any) -> None:
        self.process_group = process_group
        # revert_sync_batchnorm's target; convert_sync_batchnorm records the class it replaced.
        self._unsync_class = self._unsync_default

    def _check_channels(self, input: Tensor) -> None:
        if input.dim() >= 2 and input.shape[1] == 0:
            raise ValueError(
                f"{type(self).__name__} number of input channels should be non-zero (got input size "
                f"{tuple(input.shape)})"
            )

    def _sync_group(self) -> tuple[Any, int] | None:
        """``(group, world size)`` for a training call, ``None`` for a group of one process (unsynchronised).

        Raises before anything is counted or updated when no process group is initialised.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{type(self).__name__} synchronises its statistics over a torch.distributed process group in "
                f"training, but none is initialised (torch.distributed.is_initialized() is False). "
                + _NO_GROUP_HELP
            )
        group = dist.group.WORLD if self.process_group is None else self.process_group
        world_size = dist.get_world_size(group)
        return None if world_size == 1 else (group, world_size)

    def _forward_impl(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_channels(input)
        # As torch's SyncBatchNorm: only training is synchronised; eval (or eval with batch statistics when
        # running statistics are not tracked) is the unsynchronised layer, and so is a group of one process.
        if not self.training:
            return super()._forward_impl(input)
        sync = self._sync_group()
        if sync is None:
            return super()._forward_impl(input)
        factor = self._momentum_factor()
        track = self.track_running_stats and self.num_batches_tracked is not None
        stats = (self.running_mean, self.running_var) if track else (None, None)
        return self._sync_batch_norm(input, *stats, self.weight, self.bias, factor, self.eps, *sync)

    def _functional_batch_norm(self, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
        """``torch.nn.functional.batch_norm``'s arguments, synchronised when this layer trains on batch statistics.

        The caller (a converted subclass's own ``forward``, timm's copy of torch's) has already counted the batch
        in ``num_batches_tracked`` and turned ``momentum`` into the factor of this call, and passes the running
        statistics only when they are to be updated or used; every argument is the call's own, as for the
        unsynchronised redirect. Batch statistics outside training (``track_running_stats=False`` in eval) stay
        local, as in :meth:`_forward_impl` and torch's ``SyncBatchNorm``.
        """
        self._check_channels(input)
        sync = self._sync_group() if training and self.training else None
        if sync is None:
            fn = linf_batch_norm if self.norm is Norm.LINF else l1_batch_norm
            return fn(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      **self._functional_kwargs())
        return self._sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, *sync)

    def _sync_batch_norm(self, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                         weight: Tensor | None, bias: Tensor | None, momentum: float, eps: float, group: Any,
                         world_size: int) -> Tensor:
        if not can_read_on_host(input):
            raise RuntimeError(
                f"{type(self).__name__} cannot synchronise under torch.func transforms, torch.compile/export "
                "tracing or on meta/fake tensors (it reads the global batch size after a collective); use the "
                "unsynchronised layers there (normdecouple.revert_sync_batchnorm(model))"
            )
        y, mean, scale, count = SyncLpBatchNormFunction.apply(
            input, weight, bias, eps, self.norm, getattr(self, "k", 1), self.low_precision, group, world_size,
        )
        if running_mean is not None and running_var is not None and count > 0:
            # Every rank holds the same global statistics, so the buffers stay identical across ranks.
            update_running_stats(running_mean, running_var, mean, scale, count, momentum)
        return y


_SYNC_NOTE = r"""
    In training, the mean, the scale and the running statistics are those of the concatenation of the
    batches of every process in ``process_group`` (per-process batch sizes may differ, and may be zero), and
    the gradient of the input is that of one process holding that whole batch. The gradients of ``weight`` and
    ``bias`` are each process's share, which :class:`torch.nn.parallel.DistributedDataParallel` sums (and
    averages) with all other gradients, exactly as for :class:`torch.nn.SyncBatchNorm`. Collectives per layer:
    ${collectives} (see :mod:`normdecouple.distributed`). Every process must call the layer in every step
    (with an empty batch if it has no data), or the others wait for it.

    Behaviour of torch 2.13's :class:`torch.nn.SyncBatchNorm` that is mirrored: any input rank >= 2; the same
    constructor arguments with ``process_group`` (``None``: the default group, ``WORLD``) after
    ``track_running_stats``; no synchronisation in eval mode (the running statistics, or the local batch
    statistics when they are not tracked), nor in a group of one process; an error for zero channels.
    Departures: it runs on CPU (gloo) as well as CUDA (NCCL), where torch's raises for CPU input; and training
    without an initialised process group raises a :class:`RuntimeError` saying how to initialise one, where
    torch's silently falls back to local statistics (which would hide a misconfigured launch).

    ``low_precision=True``: each process computes its statistics in the input dtype (blocked mean of means,
    no squares), and the per-process results are combined as count-weighted means computed in float64, then
    rounded back to the input dtype; the L∞ top-k and maximum are exact in any precision. The synchronised
    path uses the PyTorch backend's arithmetic; ``backend`` applies to the unsynchronised (eval) path.

    Args:
        num_features: ``C`` from an expected input of size ``(N, C, *)``.
        eps: added to :math:`s^2` for numerical stability. Default: ``1e-5``.
        momentum: the running-average factor, or ``None`` for a cumulative average. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep running statistics. Default: ``True``.
        process_group: the group to synchronise over; ``None`` for the default (whole world). Default: ``None``.
        device, dtype: factory arguments for the parameters and buffers.
        bias: with ``affine``, whether to learn ``bias``. Default: ``True``.${extra}
        low_precision: statistics in the input dtype (fp16/bf16) without upcasting. Default: ``False``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the unsynchronised path. Default: ``"auto"``.

    Shape:
        - Input: ``(N, C, *)``, ``N`` may be 0 in training when other processes hold data
        - Output: same shape (and memory format) as the input

    Raises:
        RuntimeError: in training without an initialised ``torch.distributed`` process group.
        ValueError: for an input of rank < 2 or with no channels; in training, for at most one value per
            channel over the whole group${k_raise} (raised on every process together).

    Example::

        >>> import torch
        >>> import normdecouple as nd
        >>> layer = nd.${name}(16${example_kw}).eval()   # eval needs no process group
        >>> layer(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
        >>> # In a process of an initialised group (torch.distributed.init_process_group):
        >>> # model = torch.nn.parallel.DistributedDataParallel(nd.convert_sync_batchnorm(model))

    References: arXiv:1803.01814
"""


def _sync_doc(title: str, name: str, linf: bool) -> str:
    formula = bn.LINF_FORMULA_DOC if linf else bn.L1_FORMULA_DOC
    collectives = (
        "forward 1 all-gather, backward 1 all-reduce" if linf else "forward 2 all-reduces, backward 1 all-reduce"
    )
    return (
        f"{title} synchronised over a ``torch.distributed`` process group, for inputs of any rank >= 2: "
        f"the counterpart of :class:`torch.nn.SyncBatchNorm`.\n" + formula + string.Template(_SYNC_NOTE).substitute(
            collectives=collectives,
            extra=bn.K_ARG_DOC if linf else "",
            name=name,
            example_kw=", k=4" if linf else "",
            k_raise=", or for ``k`` above that number" if linf else "",
        )
    )


class SyncL1BatchNorm(_SyncLpBatchNorm, bn.L1BatchNormBase):
    __doc__ = _sync_doc("L1 batch normalization", "SyncL1BatchNorm", False)
    _unsync_default = bn.L1BatchNormNd

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        low_precision: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, low_precision=low_precision, backend=backend,
        )
        self._init_sync(process_group)


class SyncLinfBatchNorm(_SyncLpBatchNorm, bn.LinfBatchNormBase):
    __doc__ = _sync_doc("L∞ (top-k) batch normalization", "SyncLinfBatchNorm", True)
    _unsync_default = bn.LinfBatchNormNd

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        k: int = 1,
        low_precision: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, k=k, low_precision=low_precision, backend=backend,
        )
        self._init_sync(process_group)
