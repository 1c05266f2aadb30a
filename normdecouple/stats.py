r"""Per-channel statistics of L1 and L∞ batch normalization: the math every backend shares.

The PyTorch backend (:mod:`normdecouple._torch_backend`), the synchronised layers
(:mod:`normdecouple.distributed`, which only add collectives on top) and the Triton launchers
(:mod:`normdecouple._triton.launch`) all compute their statistics and gradients with the functions here.

Notation (one channel, n = N * spatial values): mean mu, deviations d = x - mu, scale s,
s_e = sqrt(s^2 + eps), x_hat = d / s_e, g = dL/dy * weight; means over the channel's n values.

Scales:

* L1:  s = sqrt(pi/2) * mean|d|                                          (:func:`l1_scale`)
* L∞:  s = mean of the k largest |d| / c(n, k), and t, the k-th largest |d| (:func:`linf_scale`)

Input gradient (:func:`input_grad`): if ds/dd_i = a_i, then

    dx_i = (g_i - mean(g) - (s / s_e) * (sum_j g_j x_hat_j) * (a_i - mean(a))) / s_e

* L1:  a_i = sqrt(pi/2) * u_i / n, u_i = sign(d_i)               (sign(0) = 0)
* L∞:  a_i = u_i / (k * c(n, k)), u_i = sign(d_i) * w_i, with the tie rule (:func:`linf_tie_weights`)
       w_i = 1 if |d_i| > t, (k - #{|d| > t}) / #{|d| = t} if |d_i| = t, 0 otherwise:
       the k-th place is shared evenly by all values tied there, which is the average of the
       subgradients over every way of breaking the tie (and the plain top-k gradient when there is none).

Written as ``dx = dy * (gamma / s_e) + offset + coef * u`` per channel, with
``coef = -(s / s_e) * mean(g x_hat) / s_e * (n a_i / u_i)`` and ``offset = -mean(g) / s_e - coef * mean(u)``:
:func:`input_grad_coefficients` computes (coef, offset) from the per-channel sums, which is all that the
synchronised layers need to reduce across processes.

Low precision (``low_precision=True``): every step of the statistics in the input dtype, with
:func:`pairwise_mean` (a mean of means that halves at every level, so no partial result exceeds the largest
input and the count never enters the arithmetic) and :func:`hypot_eps` (s_e without squaring anything larger
than 1); constants come from float64 on the host.

References: arXiv:1803.01814
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake  # imported by torch itself: no import-time cost

from ._constants import L1_SCALE, topk_constant

#: Most values per block of the top-k prefilter of :func:`linf_top` and :func:`linf_top_of_input` on long rows.
#: The block is the largest power of two dividing n (for linf_top; any divisor for linf_top_of_input) that is at
#: most this and leaves at least 4 (k + spare) blocks, so the candidates are at most a quarter of the row; below
#: 8 values the plain ``topk`` is used. CPU reductions over shorter contiguous blocks run slower per value.
TOPK_BLOCK = 128

__all__ = [
    "Norm",
    "accumulate_dtype",
    "computes_in_input_dtype",
    "is_channels_last",
    "canonical",
    "uncanonical",
    "channel_major",
    "per_channel",
    "pairwise_mean",
    "pairwise_channel_mean",
    "pairwise_mean_and_abs_dev",
    "pairwise_mean_keeping_rows",
    "hypot_eps",
    "traceable_topk_constant",
    "topk_constant_of_input",
    "channel_sums",
    "grad_sums",
    "l1_scale",
    "linf_scale",
    "channel_major_abs_dev",
    "linf_top",
    "linf_top_of_input",
    "linf_top_scale",
    "scale_factor",
    "linf_tie_weights",
    "linf_selected",
    "linf_selected_from_top",
    "input_grad_coefficients",
    "input_grad",
    "can_read_on_host",
    "vmapped",
]


class Norm(enum.Enum):
    """Which norm of the deviations the batch norm divides by: ``Norm.L1`` or ``Norm.LINF`` (top-k)."""

    L1 = "l1"
    LINF = "linf"

    @classmethod
    def parse(cls, value: str | Norm) -> Norm:
        """``Norm`` from ``"l1"`` / ``"linf"`` (or a ``Norm``); a ``ValueError`` naming the choices otherwise."""
        if isinstance(value, Norm):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"norm must be one of {[m.value for m in cls]}, got {value!r}") from None


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and kept in: at least float32 (float64 stays float64).

    The one place of the "at least float32" rule: running statistics, batch statistics and the backward's
    sums all use it.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def computes_in_input_dtype(dtype: torch.dtype, low_precision: bool) -> bool:
    """Whether ``low_precision=True`` takes effect: the statistics run in the input dtype for fp16/bf16 only
    (float32 and float64 inputs are their own accumulation dtype)."""
    return low_precision and dtype in (torch.float16, torch.bfloat16)


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is stored channels-last (and not also contiguous), the one other layout we keep."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def canonical(x: Tensor, channels_last: bool) -> Tensor:
    """A 3-D (A, C, B) view of ``x``: (N, C, spatial) or, for channels_last, (N*spatial, C, 1).

    Elementwise ops with a (1, C, 1) per-channel vector and reductions over dims (0, 2) run several times
    faster on this view than on the 4-D/5-D tensor; ``reshape`` copies only for other, rarer layouts.
    """
    if channels_last:
        return x.movedim(1, -1).reshape(-1, x.shape[1], 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def uncanonical(v: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    """Inverse of :func:`canonical`: the (A, C, B) tensor ``v`` back in the input's shape and layout."""
    if channels_last:
        return v.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return v.view(shape)


def channel_major(x: Tensor) -> Tensor:
    """(C, n) view of the channel's values; a copy unless the batch dimension is 1."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def per_channel(v: Tensor, x: Tensor) -> Tensor:
    """The (C,) vector ``v`` as (1, C, 1, ...), broadcastable against ``x``."""
    return v.view([1, -1] + [1] * (x.dim() - 2))


def pairwise_mean(v: Tensor) -> Tensor:
    """Row means of a (C, n) tensor in its own dtype: a pairwise mean of means, halving at every level.

    Each level computes ``a * 0.5 + b * 0.5`` of neighbours (2j, 2j + 1) in ``v.dtype``, so no intermediate
    exceeds the largest |value| (a plain fp16 sum of a few hundred activations of 1e3 would overflow) and
    rounding errors grow with log2(n), not n. The row is zero-padded to a power of two ``width``; the result is
    multiplied once by ``width / n``, a host constant in [1, 2). Any strides (a transposed view is read in
    place).
    """
    n = v.shape[1]
    if n <= 1:
        return v[:, 0] * 1.0
    halves = torch.mul(v.t(), 0.5, out=v.new_empty(n, v.shape[0]))
    return _pairwise_levels(halves, n)


def pairwise_channel_mean(view: Tensor) -> Tensor:
    """:func:`pairwise_mean` of the channels of an (A, C, B) view, bit for bit, without the channel-major copy.

    The channel's values in :func:`channel_major` order (index a * B + b) are the rows of the (A*B, C)
    transposed copy that the first level reads anyway.
    """
    a, c, b = view.shape
    if a * b <= 1:
        return view.reshape(c) * 1.0
    return _pairwise_levels(_rows(view).mul_(0.5), a * b)


def pairwise_mean_and_abs_dev(view: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, m): :func:`pairwise_channel_mean` of an (A, C, B) view and that of |view - mu|, bit for bit.

    The two means of the low-precision L1 statistics from one transposed copy of the input: |d| is computed
    (with the same elementwise operation) on the copy the first mean has read.
    """
    a, c, b = view.shape
    n = a * b
    if n <= 1:
        mean = view.reshape(c) * 1.0
        return mean, (view.reshape(c) - mean).abs() * 1.0
    rows = _rows(view)
    mean = _pairwise_levels(rows.mul(0.5), n)
    return mean, _pairwise_levels(rows.sub_(mean).abs_().mul_(0.5), n)


def pairwise_mean_keeping_rows(view: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, rows): :func:`pairwise_channel_mean` of an (A, C, B) view, and the (A*B, C) transposed copy it read.

    Row a * B + b of ``rows`` holds the values at (a, :, b): as the (A*B, C, 1) view of a channels_last input,
    it serves :func:`linf_top_of_input` (whose positions are then the channel-major ones of ``view``).
    """
    a, c, b = view.shape
    rows = _rows(view)
    if a * b <= 1:
        return view.reshape(c) * 1.0, rows
    return _pairwise_levels(rows.mul(0.5), a * b), rows


def _rows(view: Tensor) -> Tensor:
    """The (A*B, C) transposed copy of an (A, C, B) view: row a * B + b holds the values at (a, :, b)."""
    a, c, b = view.shape
    # A transposing copy then contiguous arithmetic: twice as fast as strided arithmetic on the view.
    return view.new_empty(a, b, c).copy_(view.permute(0, 2, 1)).view(a * b, c)


def _pairwise_levels(halves: Tensor, n: int) -> Tensor:
    """The levels of :func:`pairwise_mean` on (n, C) rows already multiplied by 0.5 (level l pairs rows).

    Laid out this way each level is two contiguous ops over C-wide rows (vectorised), instead of strided slices
    of every row; the levels alternate between ``halves`` (overwritten) and one buffer of half its size. The
    zero padding is never stored: at a level of odd length the last row pairs with a zero, giving ``h + 0.0``
    (the sign of a zero as the padded sum has it).
    """
    width = 1 << (n - 1).bit_length()
    length = n
    source, spare = halves, halves.new_empty(((n + 1) // 2,) + tuple(halves.shape[1:]))
    while length > 1:
        half = length // 2
        out = spare[: length - half]
        torch.add(source[0:2 * half:2], source[1:2 * half:2], out=out[:half])
        if length % 2:
            torch.add(source[length - 1], 0.0, out=out[half])
        length -= half
        if length > 1:
            out.mul_(0.5)
        source, spare = out, source
    return source[0] * (width / n)


def hypot_eps(s: Tensor, root_eps: float) -> Tensor:
    """s_e = sqrt(s^2 + root_eps^2) in s's dtype without squaring anything larger than 1."""
    floor = torch.full_like(s, root_eps)
    hi = torch.maximum(s, floor)
    lo = torch.minimum(s, floor)
    ratio = lo / hi
    return hi * torch.sqrt(1.0 + ratio * ratio)


@torch.library.custom_op("normdecouple::topk_constant", mutates_args=())
def _topk_constant_op(n: int, k: int) -> Tensor:
    return torch.tensor(topk_constant(n, k), dtype=torch.float64)


@_topk_constant_op.register_fake
def _(n: int, k: int) -> Tensor:
    return torch.empty((), dtype=torch.float64)


def traceable_topk_constant(n: int, k: int) -> float | Tensor:
    """c(n, k) as a float eagerly; under ``torch.compile`` (where n may be symbolic) through a custom op."""
    if torch.compiler.is_compiling():
        return _topk_constant_op(n, k)
    return topk_constant(n, k)


@torch.library.custom_op("normdecouple::topk_constant_of_input", mutates_args=())
def _topk_constant_of_input_op(input: Tensor, k: int) -> Tensor:
    size = input.shape  # Size.numel() is an int also while torch.jit.trace records (its items are not)
    return torch.tensor(topk_constant(size[:1].numel() * size[2:].numel(), k), dtype=torch.float64)


@_topk_constant_of_input_op.register_fake
def _(input: Tensor, k: int) -> Tensor:
    return torch.empty((), dtype=torch.float64)


def topk_constant_of_input(input: Tensor, k: int) -> float | Tensor:
    """c(n, k) for the n = N * spatial values per channel of ``input``, as :func:`traceable_topk_constant`.

    Under ``torch.jit.trace`` a custom op of the input itself, which the trace records: the traced graph then
    computes c for the batch size it runs with (a size passed as an int would be recorded as the example's).
    """
    if torch.jit.is_tracing():
        return _topk_constant_of_input_op(input.detach(), k)  # a constant: no gradient flows into the op
    return traceable_topk_constant(input.numel() // input.shape[1], k)


def scale_factor(norm: Norm, n: int, k: int) -> float | Tensor:
    """n * a_i / u_i of the module docstring: ``sqrt(pi/2)`` for L1, ``n / (k c(n, k))`` for L∞."""
    if norm is Norm.L1:
        return L1_SCALE
    return n / (k * traceable_topk_constant(n, k))


def channel_sums(v: Tensor, acc: torch.dtype) -> Tensor:
    """Sums of an (A, C, B) view over dims (0, 2), accumulated and returned in ``acc``.

    Half inputs, and the (A, C, 1) views of channels_last inputs, are summed by torch's batch-norm backward
    reduction (as the bias gradient of ``v`` itself): twice as fast there as ``sum``, which first converts a
    half tensor to ``acc`` and reduces the strided dimension slowly. Not for traced graphs (an aten op), nor
    under ``vmap`` (whose rule for that op returns no bias gradient without a weight).
    """
    if v.dtype == acc and v.shape[2] > 1 or torch.compiler.is_compiling() or v.numel() == 0 or vmapped(v):
        return v.sum(dim=(0, 2), dtype=acc)
    zeros = torch.zeros(v.shape[1], dtype=acc, device=v.device)
    return torch.ops.aten.native_batch_norm_backward(
        v, v, None, None, None, zeros, torch.ones_like(zeros), True, 0.0, [False, False, True]
    )[2]


def grad_sums(grad: Tensor, values: Tensor, mean: Tensor, inv_std: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum(grad * (values - mean) * inv_std), sum(grad))`` per channel, in at least float32, in one pass.

    torch's fused batch-norm backward reduction (``native_batch_norm_backward`` without the input gradient), on
    tensors of any layout. Under ``vmap`` over the backward, whose rule for that op returns nothing without a
    weight and refuses half inputs with float32 statistics, plain reductions in ``inv_std``'s dtype instead.
    """
    if vmapped(grad) or vmapped(values):
        acc = inv_std.dtype
        dims = [0] + list(range(2, values.dim()))
        g = grad.to(acc)
        xhat = (values.to(acc) - per_channel(mean.to(acc), values)) * per_channel(inv_std, values)
        return (g * xhat).sum(dim=dims), g.sum(dim=dims)
    _, sum_grad_xhat, sum_grad = torch.ops.aten.native_batch_norm_backward(
        grad, values, None, None, None, mean, inv_std, True, 0.0, [False, True, True]
    )
    return sum_grad_xhat, sum_grad


def l1_scale(abs_dev: Tensor, n: int, lowp: bool) -> Tensor:
    """s = sqrt(pi/2) mean|d| from |d| laid out as (A, C, B), or as (C, n) when ``lowp``.

    ``lowp``: the mean is :func:`pairwise_mean` (of a (C, n) tensor) or :func:`pairwise_channel_mean` (of an
    (A, C, B) view), the same bits either way.
    """
    if lowp:
        mean = pairwise_channel_mean(abs_dev) if abs_dev.dim() == 3 else pairwise_mean(abs_dev)
        return mean * L1_SCALE
    return channel_sums(abs_dev, abs_dev.dtype) * (L1_SCALE / n)


def linf_scale(abs_dev: Tensor, n: int, k: int, lowp: bool) -> tuple[Tensor, Tensor]:
    """(s, t): the top-k mean of |d| over c(n, k), and t, the k-th largest |d|.

    ``abs_dev`` is (C, n) when ``lowp`` (then the top-k mean is a :func:`pairwise_mean`), else (A, C, B).
    """
    rows = abs_dev if lowp else channel_major(abs_dev)
    values, _ = linf_top(rows, k)
    return linf_top_scale(values, n, k, lowp)


def channel_major_abs_dev(view: Tensor, mean: Tensor, dev: Tensor | None = None) -> Tensor:
    """|d| = |x - mean| of an (A, C, B) view as (C, n) rows, the subtraction writing the channel-major layout.

    One pass instead of a subtraction and a copy; the values are those of ``(view - mean[:, None]).abs()``
    (the same operation and dtypes, elementwise). ``dev``: d already computed (A, C, B); then only |d| is
    written, channel-major.
    """
    if torch.compiler.is_compiling():
        # The compiler fuses the subtraction with the copy itself (and mishandles ``out=`` with dynamic shapes).
        return channel_major((view - mean[:, None]).abs() if dev is None else dev.abs())
    a, c, b = view.shape
    if b == 1:
        # Channels contiguous (channels_last): a transposing subtraction is many times slower than the copy.
        return channel_major((view - mean[:, None]).abs_() if dev is None else dev.abs())
    rows = torch.empty((c, a, b), dtype=torch.promote_types(view.dtype, mean.dtype), device=view.device)
    if dev is not None:
        return torch.abs(dev.transpose(0, 1), out=rows).view(c, a * b)
    torch.sub(view.transpose(0, 1), mean[:, None, None], out=rows)
    return rows.abs_().view(c, a * b)


def linf_top(rows: Tensor, k: int, spare: int = 0) -> tuple[Tensor, Tensor]:
    """The K = min(n, k + spare) largest values of each (C, n) row, largest first, and their positions in the row.

    ``spare`` places beyond k let :func:`linf_selected_from_top` find the values tied with the k-th without
    another pass over the data. Which of several equal values is returned is unspecified (as for ``topk``).

    For long rows the top-K is taken among the K blocks (of ``TOPK_BLOCK`` or fewer values) with the largest
    maxima: each of those blocks holds a value at least as large as any value outside them, so the K largest of
    their union are the K largest of the row. One max-reduction over contiguous blocks replaces ``topk`` over the
    whole row, whose CPU kernel first copies every value with its index.
    """
    c, n = rows.shape
    count = min(n, k + spare)
    block = 1 << (min(TOPK_BLOCK, n // (4 * count), n & -n).bit_length() - 1) if n >= 4 * count else 1
    if block < 8 or torch.compiler.is_compiling():
        top = rows.topk(count, dim=1, sorted=True)
        return top.values, top.indices
    blocks = rows.view(c, n // block, block)
    best = blocks.amax(dim=2).topk(count, dim=1, sorted=False).indices
    candidates = blocks.gather(1, best[:, :, None].expand(c, count, block)).view(c, count * block)
    top = candidates.topk(count, dim=1, sorted=True)
    slot = torch.div(top.indices, block, rounding_mode="floor")
    return top.values, best.gather(1, slot) * block + top.indices % block


def linf_top_of_input(view: Tensor, mean: Tensor, k: int, spare: int = 0) -> tuple[Tensor, Tensor] | None:
    """:func:`linf_top` of |view - mean| for an (A, C, 1) view (channels_last, or 2-D input), without |d|.

    There the channel-major layout of |d| would be a slow transposing write. Instead the rows are cut into
    blocks of ``TOPK_BLOCK`` or fewer consecutive rows (a divisor of A): a block's largest |d| is
    ``max(fl(max - mu), fl(mu - min))``, exactly the largest |fl(x - mu)| since rounding is monotone, so two
    reductions over the middle dimension of an (A / block, block, C) view (vectorised along C) give every
    block's maximum; the K = min(n, k + spare) blocks with the largest maxima hold the K largest |d| (see
    :func:`linf_top`), which are then computed from their few values with the forward's exact operation.
    Returns None for other views, when the blocks would be too few to pay off, and while compiling (the
    caller then uses :func:`channel_major_abs_dev` and :func:`linf_top`).
    """
    a, c, b = view.shape
    count = min(a * b, k + spare)
    block = next(d for d in range(min(TOPK_BLOCK, a // (4 * count)), 0, -1) if a % d == 0) if a >= 4 * count else 1
    if b != 1 or block < 8 or torch.compiler.is_compiling():
        return None
    centre = mean.to(torch.promote_types(view.dtype, mean.dtype))
    blocks = view.view(a // block, block, c)
    block_max = torch.maximum(blocks.amax(dim=1) - centre, centre - blocks.amin(dim=1)).t()  # (C, A / block)
    first = block_max.topk(count, dim=1, sorted=False).indices * block  # (C, K): first row of each block
    rows = first[:, :, None] + torch.arange(block, device=view.device)
    channel = torch.arange(c, device=view.device)[:, None, None]
    values = view.reshape(a, c).take(rows * c + channel)
    top = (values - centre[:, None, None]).abs_().view(c, count * block).topk(count, dim=1, sorted=True)
    slot = torch.div(top.indices, block, rounding_mode="floor")
    return top.values, first.gather(1, slot) + top.indices % block


def linf_top_scale(values: Tensor, n: int, k: int, lowp: bool) -> tuple[Tensor, Tensor]:
    """(s, t) of :func:`linf_scale` from the sorted largest |d| of :func:`linf_top` ((C, >= k), largest first)."""
    inv_c = 1.0 / traceable_topk_constant(n, k)
    top = values[:, :k]
    mean_top = pairwise_mean(top) if lowp else top.mean(dim=1)
    return mean_top * inv_c, values[:, k - 1]


def linf_tie_weights(abs_dev: Tensor, threshold: Tensor, k: int, dims: tuple[int, ...]) -> Tensor:
    """w_i of the L∞ tie rule for every value: 1 above t, (k - #above) / #tied at t, 0 below.

    ``abs_dev`` has its channels on the one dimension not in ``dims`` (the reduced ones); ``threshold`` (t) is
    per channel. t = 0 means every |d| of that channel is 0; its weights are then the share (finite, and
    multiplied by sign(d) = 0 wherever they are used).
    """
    shape = [1] * abs_dev.dim()
    channel_dim = next(i for i in range(abs_dev.dim()) if i not in dims)
    shape[channel_dim] = -1
    thr = threshold.to(abs_dev.dtype).view(shape)
    tied = abs_dev == thr
    above = abs_dev > thr
    acc = accumulate_dtype(abs_dev.dtype)
    n_tied = tied.sum(dim=dims, dtype=acc).clamp(min=1)
    share = ((k - above.sum(dim=dims, dtype=acc)) / n_tied).view(shape)
    return torch.where(above, 1.0, torch.where(tied, share, 0.0))


def linf_selected(
    view: Tensor, dev_mean: Tensor, threshold: Tensor, acc: torch.dtype
) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """The values with |d| >= t > 0: their indices into the (A, C, B) ``view``, sign(d), and whether |d| > t.

    Only these carry the L∞ scale's gradient (about k per channel), so everything after the one comparison
    pass is tiny. d is recomputed with the forward's exact operation, so the comparisons with t are
    bit-for-bit the forward's. t = 0 (a constant channel, e.g. a dead ReLU) has no scale gradient anywhere,
    so nothing is selected there. Needs ``nonzero``, a host sync: traced graphs use :func:`linf_tie_weights`.
    """
    abs_dev = (view - dev_mean[:, None]).abs_()
    thr = threshold.to(abs_dev.dtype)
    select_from = torch.where(thr > 0, thr, torch.full_like(thr, float("inf")))
    index = torch.nonzero(abs_dev >= select_from[:, None], as_tuple=True)
    del abs_dev
    d_selected = view[index] - dev_mean[index[1]]
    above = d_selected.abs() > thr[index[1]]
    return index, torch.sign(d_selected).to(acc), above


def linf_selected_from_top(
    view: Tensor, dev_mean: Tensor, threshold: Tensor, values: Tensor, positions: Tensor, acc: torch.dtype
) -> tuple[tuple[Tensor, ...], Tensor, Tensor] | None:
    """:func:`linf_selected` from the forward's candidates (:func:`linf_top`), without a pass over the data.

    The candidates hold every |d| >= t when they are the whole row or when the smallest of them is below t
    (every value left out is at most that one); then the selection is read from them, and d of the selected
    values recomputed with the forward's exact operation. Otherwise (more values tied with the k-th largest
    than spare places) returns None: the caller scans with :func:`linf_selected`. Reads a flag on the host.
    """
    a, _, b = view.shape
    thr = threshold.to(values.dtype)
    if values.shape[1] < a * b and bool((values[:, -1] >= thr).any()):
        return None
    chosen = (values >= thr[:, None]) & (thr > 0)[:, None]
    channel, slot = torch.nonzero(chosen, as_tuple=True)
    position = positions[channel, slot]
    index = (torch.div(position, b, rounding_mode="floor"), channel, position % b)
    d_selected = view[index] - dev_mean[channel]
    above = d_selected.abs() > thr[channel].to(d_selected.dtype)
    return index, torch.sign(d_selected).to(acc), above


def input_grad_coefficients(
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    sum_u: Tensor,
    gamma: Tensor,
    scale: Tensor,
    inv_std: Tensor,
    n: int,
    factor: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Per-channel (coef, offset) of ``dx = dy * gamma / s_e + offset + coef * u`` from the channel sums.

    Args:
        sum_dy, sum_dy_xhat: sum(dL/dy) and sum(dL/dy * x_hat) over the channel's n values.
        sum_u: sum of u (sign(d) for L1, sign(d) w for L∞).
        gamma: the weight (ones without affine), scale: s, inv_std: 1/s_e, all (C,).
        n: the number of values per channel; factor: :func:`scale_factor`.
    """
    mean_g = gamma * sum_dy / n
    mean_g_xhat = gamma * sum_dy_xhat / n
    coef = -(scale * inv_std) * inv_std * mean_g_xhat * factor
    offset = -(mean_g * inv_std) - coef * (sum_u / n)
    return coef, offset


def input_grad(
    dy: Tensor, u: Tensor, gamma: Tensor, inv_std: Tensor, coef: Tensor, offset: Tensor, *, out: Tensor | None = None
) -> Tensor:
    """``dx = dy * gamma / s_e + offset + coef * u`` on (A, C, B) views, in the dtype of ``coef``.

    ``out`` (optional, of that dtype and u's shape) receives the result; it may be ``u`` itself, which saves
    the allocation of the largest temporary of the backward. It is ignored under ``vmap`` over the backward
    (:func:`vmapped`: per-sample gradients, ``gradcheck(check_batched_grad=True)``), where the same arithmetic
    runs out of place: vmap has no rule for ``out=`` ops, and in-place ``addcmul_`` falls back (with a warning).
    """
    if any(vmapped(t) for t in (dy, u, gamma, inv_std, coef, offset)):
        return torch.addcmul(u * coef[:, None] + offset[:, None], dy, (gamma * inv_std)[:, None])
    grad_x = torch.mul(u, coef[:, None]) if out is None else torch.mul(u, coef[:, None], out=out)
    return grad_x.add_(offset[:, None]).addcmul_(dy, (gamma * inv_std)[:, None])


def vmapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` tensor (``vmap``, ``grad``, ...) or a batched one of
    ``torch.autograd.grad(..., is_grads_batched=True)`` (which vectorises the backward with torch's legacy vmap).

    A backward receiving such gradients must not use ``out=`` ops or a few fused kernels whose batching rules
    are missing or narrower than the kernels (the callers say which). False while compiling (the compiler
    handles its own transforms, and cannot trace these checks).
    """
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    return functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t)


def can_read_on_host(t: Tensor) -> bool:
    """Whether reading ``t``'s values on the host is possible here: not while tracing or transforming.

    False under ``torch.compile``/``torch.export``, while ``torch.jit.trace`` records (a value read on the host
    would be baked into the trace), for meta and fake tensors (``FakeTensorMode``), and for
    the wrapped tensors of ``torch.func`` transforms; the callers then skip only what needs the value (the
    non-finite-statistics warning) or take a path without data-dependent shapes.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or t.device.type == "meta":
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    return not is_fake(t)
